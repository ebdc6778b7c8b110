// Checking a webhook POST came from the Tunery server: `Tunery-Signature: t=<unix seconds>,v1=<hex>`
// is the HMAC-SHA256 of `<t>.<raw body>` keyed with the webhook's secret. WebCrypto only, so it runs
// in Node, browsers' service workers and edge runtimes alike.

export interface VerifyWebhookOptions {
  /** Refuse signatures older (or newer) than this many seconds: a replayed POST. Default 300. */
  toleranceSeconds?: number | undefined;
  /** The time to check against (tests). Default: now. */
  now?: Date | undefined;
}

/**
 * Whether `body` (the raw request body, exactly as received) carries a valid `signatureHeader` for
 * `secret`, signed within the tolerance. Compare before parsing the body.
 */
export async function verifyWebhookSignature(
  body: string,
  signatureHeader: string | null | undefined,
  secret: string,
  { toleranceSeconds = 300, now = new Date() }: VerifyWebhookOptions = {},
): Promise<boolean> {
  const match = /^t=(\d+),v1=([0-9a-f]{64})$/.exec(signatureHeader ?? '');
  if (!match) return false;
  const [, t, v1] = match as unknown as [string, string, string];
  if (Math.abs(now.getTime() / 1000 - Number(t)) > toleranceSeconds) return false;
  const encoder = new TextEncoder();
  const key = await globalThis.crypto.subtle.importKey(
    'raw',
    encoder.encode(secret),
    { name: 'HMAC', hash: 'SHA-256' },
    false,
    ['verify'],
  );
  const expected = new Uint8Array(v1.match(/../g)!.map((byte) => Number.parseInt(byte, 16)));
  // subtle.verify compares in constant time.
  return globalThis.crypto.subtle.verify('HMAC', key, expected, encoder.encode(`${t}.${body}`));
}
