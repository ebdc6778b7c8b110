/**
 * JSON request bodies: parsed with limits on size and nesting depth, and refused when a string holds
 * text Postgres cannot store. Everything here runs before authentication, so each check is a single
 * O(n) pass that allocates nothing per level and cannot recurse deeper than the depth it allows.
 */
import express, { type NextFunction, type Request, type RequestHandler, type Response } from 'express';
import { ApiError } from './errors.js';

/** Deepest nesting of objects and arrays a body may have; real bodies stay under ten. */
export const MAX_JSON_DEPTH = 64;

const JSON_TYPES = ['application/json', 'application/*+json'];

const OPEN_BRACE = 0x7b;
const OPEN_BRACKET = 0x5b;
const CLOSE_BRACE = 0x7d;
const CLOSE_BRACKET = 0x5d;
const QUOTE = 0x22;
const BACKSLASH = 0x5c;

/**
 * True when the raw JSON text (UTF-8) nests objects/arrays deeper than `max`. Counts brackets
 * outside strings; malformed text is left for JSON.parse to refuse. Bytes can be scanned directly:
 * every structural character is ASCII, never part of a multi-byte sequence.
 */
export function nestsDeeperThan(raw: Uint8Array | string, max: number): boolean {
  const bytes = typeof raw === 'string' ? Buffer.from(raw, 'utf8') : raw;
  let depth = 0;
  for (let i = 0; i < bytes.length; i++) {
    const c = bytes[i];
    if (c === QUOTE) i = closingQuote(bytes, i);
    else if (c === OPEN_BRACE || c === OPEN_BRACKET) {
      if (++depth > max) return true;
    } else if (c === CLOSE_BRACE || c === CLOSE_BRACKET) depth--;
  }
  return false;
}

/** Index of the quote that ends the string opened at `open` (or the end): found by memchr, not a loop. */
function closingQuote(bytes: Uint8Array, open: number): number {
  let at = open;
  for (;;) {
    at = bytes.indexOf(QUOTE, at + 1);
    if (at < 0) return bytes.length;
    // Escaped when an odd number of backslashes precede it.
    let backslashes = 0;
    while (bytes[at - 1 - backslashes] === BACKSLASH) backslashes++;
    if (backslashes % 2 === 0) return at;
  }
}

/** Runs on the raw body before JSON.parse: refuses nesting past MAX_JSON_DEPTH. */
function checkDepth(_req: unknown, _res: unknown, buf: Buffer, encoding: string | null): void {
  let text: Uint8Array | string = buf;
  // Other charsets are decoded first: in UTF-16, a bracket's byte can be half of another character.
  if (encoding && encoding !== 'utf-8' && encoding !== 'utf8') {
    try {
      text = new TextDecoder(encoding).decode(buf);
    } catch {
      throw new ApiError(400, 'invalid_request', `Unsupported charset "${encoding}"; send UTF-8 JSON.`);
    }
  }
  if (nestsDeeperThan(text, MAX_JSON_DEPTH))
    throw new ApiError(
      400,
      'invalid_request',
      `JSON body nests objects and arrays deeper than ${MAX_JSON_DEPTH} levels.`,
    );
}

// With the `u` flag a well-formed pair is one code point, so only an unpaired half matches.
const LONE_SURROGATE = /\p{Surrogate}/u;

/**
 * The path (`['llm_calls', '0', 'user_prompt']`) of the first string in `value` that holds a lone
 * UTF-16 surrogate (`"\ud800"` is valid JSON, but not storable text), or undefined. A bad key names
 * the object that holds it. Recursion is bounded by MAX_JSON_DEPTH, checked before parsing.
 */
export function loneSurrogatePath(value: unknown, path: string[] = []): string[] | undefined {
  if (typeof value === 'string') return LONE_SURROGATE.test(value) ? path : undefined;
  if (!value || typeof value !== 'object') return undefined;
  for (const [key, item] of Object.entries(value)) {
    if (LONE_SURROGATE.test(key)) return path;
    path.push(key);
    const found = loneSurrogatePath(item, path);
    if (found) return found;
    path.pop();
  }
  return undefined;
}

function refuseLoneSurrogates(req: Request, _res: Response, next: NextFunction): void {
  const path = req.body && typeof req.body === 'object' ? loneSurrogatePath(req.body) : undefined;
  if (!path) {
    next();
    return;
  }
  const param = path.length ? path.join('.') : null;
  const where = param ?? 'request';
  next(
    new ApiError(
      400,
      'invalid_request',
      `${where}: text may not contain a lone UTF-16 surrogate (an unpaired \\ud800–\\udfff escape).`,
      param,
    ),
  );
}

/** The JSON body parser of every route: size limit, depth limit, storable strings only. */
export function jsonBody(limit: number): RequestHandler[] {
  return [express.json({ limit, type: JSON_TYPES, verify: checkDepth }), refuseLoneSurrogates];
}
