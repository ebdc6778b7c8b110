import { type ClientOptions, TuneryClient } from './client.js';

/** A group of operations. Holds only the client; each method is one call on it. */
export abstract class APIResource {
  protected readonly _client: TuneryClient;

  constructor(client: TuneryClient) {
    this._client = client;
  }
}

/** A client as given, or a new one from options (for resources that can stand alone). */
export function clientFrom(clientOrOptions: TuneryClient | ClientOptions | undefined): TuneryClient {
  return clientOrOptions instanceof TuneryClient ? clientOrOptions : new TuneryClient(clientOrOptions);
}
