/**
 * The server's logger. Secrets (API keys, worker tokens, lease tokens, teacher and hub keys) never
 * reach a log line, at any level, three ways over: known header paths are redacted, any logged
 * field whose name says it is a secret is redacted, and, as the last step before a line is written,
 * anything shaped like a Tunery secret or a bearer credential is masked (error messages and stacks
 * included).
 */
import { type DestinationStream, type Logger, pino, stdSerializers } from 'pino';

export const REDACTED = '[redacted]';

/** Where request logs keep credentials (pino-http's serialized `req` and `res`). */
const REDACT_PATHS = [
  'req.headers.authorization',
  'req.headers["proxy-authorization"]',
  'req.headers["x-lease-token"]',
  'req.headers["x-api-key"]',
  'req.headers.cookie',
  'res.headers["set-cookie"]',
];

/**
 * Field names that hold a secret: `authorization`, `api_key`, `teacher_api_key`, `hf_token`,
 * `lease_token`, …, and the values a failed statement was sent (`bindings`, on knex's errors).
 */
const SECRET_FIELD =
  /^(authorization|proxy-authorization|cookie|set-cookie|bindings)$|(^|[_-])(api[_-]?key|token|secret|password)$/i;

/**
 * Secret-shaped text anywhere in a line: Tunery keys, worker tokens and lease tokens (`tk_`, `tw_`,
 * `lease_` + 32 base64url characters, see ids.ts), and whatever follows `Bearer`.
 */
const SECRET_TEXT = /\b(tk|tw|lease)_[A-Za-z0-9_-]{32}|\b(Bearer)\s+[^\s"',;]+/gi;

/** Masks secret-shaped text in one serialized log line. */
export function maskSecretText(line: string): string {
  return line.replace(SECRET_TEXT, (_match, prefix?: string, bearer?: string) =>
    bearer ? `${bearer} ${REDACTED}` : `${prefix}_${REDACTED}`,
  );
}

/** The prototype of what pino's error serializers make of an error (its fields, its cause). */
const SERIALIZED_ERROR = Object.getPrototypeOf(stdSerializers.errWithCause(new Error()));

/**
 * A copy of a logged object with secret-named fields redacted. Only plain objects, arrays and
 * serialized errors are walked (requests and sockets go through their serializers), to a bounded
 * depth.
 */
function redactSecretFields(value: unknown, depth = 0): unknown {
  if (depth > 8 || !value || typeof value !== 'object') return value;
  if (Array.isArray(value)) return value.map((item) => redactSecretFields(item, depth + 1));
  const proto = Object.getPrototypeOf(value);
  if (proto !== Object.prototype && proto !== null && proto !== SERIALIZED_ERROR) return value;
  const out: Record<string, unknown> = {};
  for (const [key, item] of Object.entries(value)) {
    out[key] = SECRET_FIELD.test(key) && item != null ? REDACTED : redactSecretFields(item, depth + 1);
  }
  return out;
}

export function createLogger(level: string, destination?: DestinationStream): Logger {
  return pino(
    {
      level,
      redact: { paths: REDACT_PATHS, censor: REDACTED },
      // An error's cause is logged as an error of its own, with its own fields (a database error's
      // code and detail), not only its message and stack appended to the error's; the fields of
      // both are redacted as a logged object's are (the formatter below sees errors unserialized).
      serializers: { err: (err: Error) => redactSecretFields(stdSerializers.errWithCause(err)) },
      formatters: { log: (object) => redactSecretFields(object) as Record<string, unknown> },
      hooks: { streamWrite: maskSecretText },
    },
    destination,
  );
}
