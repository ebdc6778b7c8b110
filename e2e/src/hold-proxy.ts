/**
 * An HTTP proxy between workers and the server that can hold one request: the first request a
 * test's matcher picks is forwarded to the server as usual, and the server's answer is kept back
 * from the worker, which waits on it. A test thus stops a worker at a known point — say, right
 * after the server stored its checkpoint 10 — instead of polling for a moment that a fast worker
 * may already have passed. The held answer can be released (the worker goes on) or dropped with
 * the worker (kill -9).
 */
import {
  createServer,
  type IncomingHttpHeaders,
  type IncomingMessage,
  request,
  type Server,
  type ServerResponse,
} from 'node:http';
import type { AddressInfo } from 'node:net';

export interface ProxiedRequest {
  method: string;
  /** Path and query, as the worker sent them. */
  path: string;
  headers: IncomingHttpHeaders;
}

export interface AnsweredRequest extends ProxiedRequest {
  status: number;
}

/** A request the server has answered and the worker is still waiting on. */
export interface HeldRequest extends AnsweredRequest {
  /** Hands the server's answer to the worker at last. */
  release(): void;
}

interface Waiter {
  match: (req: ProxiedRequest) => boolean;
  resolve: (held: HeldRequest) => void;
}

export class HoldProxy {
  private waiter: Waiter | undefined;
  private readonly answeredListeners = new Set<(req: AnsweredRequest) => void>();
  private readonly open = new Set<ServerResponse>();

  private constructor(
    private readonly server: Server,
    private readonly target: URL,
  ) {}

  /** Starts a proxy on a free port of 127.0.0.1 that forwards to `target` (the server's URL). */
  static async start(target: string): Promise<HoldProxy> {
    let proxy!: HoldProxy;
    const server = createServer((req, res) => proxy.forward(req, res));
    proxy = new HoldProxy(server, new URL(target));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    return proxy;
  }

  get url(): string {
    return `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  /**
   * Holds the next request `match` picks (checked when a request arrives); resolves once the
   * server has answered it. One hold at a time; every other request passes straight through.
   */
  holdNext(match: (req: ProxiedRequest) => boolean): Promise<HeldRequest> {
    if (this.waiter) throw new Error('HoldProxy holds one request at a time');
    return new Promise((resolve) => {
      this.waiter = { match, resolve };
    });
  }

  /** Calls `listener` with every request the server has answered (before the worker sees it). */
  onAnswered(listener: (req: AnsweredRequest) => void): () => void {
    this.answeredListeners.add(listener);
    return () => this.answeredListeners.delete(listener);
  }

  async close(): Promise<void> {
    for (const res of this.open) res.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private forward(req: IncomingMessage, res: ServerResponse): void {
    const seen: ProxiedRequest = { method: req.method ?? 'GET', path: req.url ?? '/', headers: req.headers };
    const waiter = this.waiter?.match(seen) ? this.waiter : undefined;
    if (waiter) this.waiter = undefined;
    this.open.add(res);
    res.once('close', () => this.open.delete(res));

    const upstream = request(
      new URL(seen.path, this.target),
      { method: seen.method, headers: { ...req.headers, host: this.target.host } },
      (answer) => this.answer(seen, answer, res, waiter),
    );
    // The server went away (a drill killed it): the worker sees a dropped connection, as it would.
    upstream.once('error', () => res.destroy());
    req.pipe(upstream);
  }

  private answer(seen: ProxiedRequest, answer: IncomingMessage, res: ServerResponse, waiter?: Waiter): void {
    const chunks: Buffer[] = [];
    answer.on('data', (chunk: Buffer) => chunks.push(chunk));
    answer.once('error', () => res.destroy());
    answer.once('end', () => {
      const status = answer.statusCode ?? 502;
      const send = () => {
        if (res.destroyed) return;
        res.writeHead(status, answer.headers);
        res.end(Buffer.concat(chunks));
      };
      for (const listener of this.answeredListeners) listener({ ...seen, status });
      if (waiter) waiter.resolve({ ...seen, status, release: send });
      else send();
    });
  }
}
