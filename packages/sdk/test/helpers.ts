// A mock Tunery server (msw + @tunery/sdk/mocks from source) and clients pointed at it.
import { setupServer } from 'msw/node';
import { afterAll, afterEach, beforeAll } from 'vitest';
import { type ClientOptions, Tunery } from '../src/index.js';
import { createTuneryMock, type TuneryMock, type TuneryMockOptions } from '../src/mocks/index.js';

export const BASE_URL = 'http://tunery.test';

/** Starts an msw server for the current test file; the mock's state is reset after each test. */
export function useMockServer(options: TuneryMockOptions = {}) {
  const mock: TuneryMock = createTuneryMock({ baseURL: BASE_URL, ...options });
  const server = setupServer(...mock.handlers);
  beforeAll(() => server.listen({ onUnhandledRequest: 'error' }));
  afterEach(() => {
    server.resetHandlers();
    mock.reset();
  });
  afterAll(() => server.close());
  const client = (overrides: ClientOptions = {}) =>
    new Tunery({ baseURL: BASE_URL, apiKey: 'tk_test', logLevel: 'off', ...overrides });
  return { mock, server, client };
}

/** A quiet logger that keeps what it was told. */
export function memoryLogger() {
  const lines: { level: string; message: string }[] = [];
  const at = (level: string) => (message: string) => {
    lines.push({ level, message });
  };
  return { lines, logger: { error: at('error'), warn: at('warn'), info: at('info'), debug: at('debug') } };
}
