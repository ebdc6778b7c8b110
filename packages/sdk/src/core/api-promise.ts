// The promise every API method returns: awaits to the parsed body, and `.withResponse()` gives the
// raw Response and the request id too.

/** A parsed body together with the HTTP response it came from. */
export interface WithResponse<T> {
  data: T;
  response: Response;
  /** The server's `x-request-id`. */
  requestId: string | null;
}

export class APIPromise<T> extends Promise<T> {
  // `then` below never goes through the species constructor; anything that does gets a plain Promise.
  static override get [Symbol.species]() {
    return Promise;
  }

  #parsed: Promise<T> | undefined;
  readonly #responsePromise: Promise<WithResponse<T>>;

  constructor(responsePromise: Promise<WithResponse<T>>) {
    super((resolve) => resolve(undefined as T));
    this.#responsePromise = responsePromise;
  }

  /** The parsed body, the Response and the request id. */
  withResponse(): Promise<WithResponse<T>> {
    return this.#responsePromise;
  }

  /** The raw Response (its body already consumed for JSON calls; a stream for downloads). */
  asResponse(): Promise<Response> {
    return this.#responsePromise.then((r) => r.response);
  }

  #parse(): Promise<T> {
    this.#parsed ??= this.#responsePromise.then((r) => r.data);
    return this.#parsed;
  }

  // biome-ignore lint/suspicious/noThenProperty: an APIPromise is a Promise; `then` reads the parsed body.
  override then<R1 = T, R2 = never>(
    onfulfilled?: ((value: T) => R1 | PromiseLike<R1>) | null,
    onrejected?: ((reason: unknown) => R2 | PromiseLike<R2>) | null,
  ): Promise<R1 | R2> {
    return this.#parse().then(onfulfilled, onrejected);
  }

  override catch<R = never>(onrejected?: ((reason: unknown) => R | PromiseLike<R>) | null): Promise<T | R> {
    return this.#parse().catch(onrejected);
  }

  override finally(onfinally?: (() => void) | null): Promise<T> {
    return this.#parse().finally(onfinally);
  }
}
