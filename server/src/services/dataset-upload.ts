/**
 * Multipart dataset uploads (`POST /v1/datasets`, form field `file`), streamed: a multer storage
 * engine that express-openapi-validator runs after authentication. The file goes straight from
 * the socket through the JSONL validator into its part file (`storage.openPart`), so memory stays
 * bounded whatever the file's size and however many uploads run at once, and the size limit and
 * the quota are enforced while the bytes arrive.
 */
import { createHash } from 'node:crypto';
import type { Readable } from 'node:stream';
import type { Request } from 'express';
import type { AppContext } from '../context.js';
import { ApiError } from '../errors.js';
import { newId } from '../ids.js';
import { type PreparedDataset, prepareJsonlDataset } from './datasets.js';
import { checkOpenAIChatLine } from './openai-files.js';

/** The form field that carries the JSONL. */
export const UPLOAD_FIELD = 'file';

/**
 * The operations whose multipart `file` is a dataset, with the further check each line gets: the
 * OpenAI-compatible upload takes OpenAI's chat format only.
 */
const UPLOAD_OPERATIONS: Record<string, { checkLine?: (record: unknown) => void }> = {
  createDataset: {},
  createOpenAIFile: { checkLine: checkOpenAIChatLine },
};

/** A file as multer hands it to the engine. */
interface IncomingFile {
  fieldname: string;
  originalname: string;
  stream: Readable;
}

/** A streamed, validated dataset file waiting for the route. */
export interface StreamedDataset {
  /** The id the file was written for: the dataset gets it. */
  datasetId: string;
  prepared: PreparedDataset;
  /** SHA-256 of the bytes as sent (an idempotency key is bound to it). */
  rawSha256: string;
  /** Set by the route when it takes the file over (then it records or discards it itself). */
  claimed: boolean;
}

/** What the engine leaves in `req.files` for the route. */
export interface DatasetUploadFile {
  fieldname: string;
  originalname: string;
  upload?: StreamedDataset;
  /** Why the file was refused; the route answers with it once the request has been read. */
  refusal?: ApiError;
}

type Callback = (err: Error | null, info?: Partial<DatasetUploadFile>) => void;

/**
 * Removes the parts of uploads no route took over (a request refused after its file arrived), so
 * that an error answer goes out only once nothing of the request is left on disk.
 */
export async function discardUnclaimedUploads(req: Request): Promise<void> {
  const files = (req.files as DatasetUploadFile[] | undefined) ?? [];
  await Promise.all(
    files.map((file) => {
      if (!file.upload || file.upload.claimed) return undefined;
      file.upload.claimed = true; // the discard on close (below) has nothing left to do
      return file.upload.prepared.part.discard();
    }),
  );
}

/**
 * Options for the validator's `fileUploader` (multer): this engine, one file of at most
 * TUNERY_MAX_UPLOAD_BYTES, and a few short text fields (`name`, `idempotency_key`), so no part of
 * a form is held in memory beyond a few KB.
 */
export function datasetUploadOptions(ctx: AppContext) {
  return {
    storage: new DatasetUploadEngine(ctx),
    limits: { fileSize: ctx.config.maxUploadBytes, files: 1, fields: 8, fieldSize: 16 * 1024 },
  };
}

class DatasetUploadEngine {
  constructor(private readonly ctx: AppContext) {}

  _handleFile(req: Request, file: IncomingFile, cb: Callback): void {
    const operationId = (req as { openapi?: { schema?: { operationId?: string } } }).openapi?.schema
      ?.operationId;
    const operation = Object.hasOwn(UPLOAD_OPERATIONS, operationId ?? '')
      ? UPLOAD_OPERATIONS[operationId!]
      : undefined;
    if (!operation || file.fieldname !== UPLOAD_FIELD) {
      file.stream.resume();
      cb(null, {
        refusal: new ApiError(400, 'invalid_request', 'Attach the JSONL as the form field "file".', 'file'),
      });
      return;
    }
    const datasetId = newId('ds');
    const raw = createHash('sha256');
    // Not destroyed when validation stops early: the rest is drained so multer can finish the form.
    const chunks = file.stream.iterator({ destroyOnReturn: false });
    async function* hashed(): AsyncGenerator<Buffer> {
      for await (const chunk of chunks) {
        raw.update(chunk as Buffer);
        yield chunk as Buffer;
      }
    }
    prepareJsonlDataset(this.ctx, datasetId, hashed(), UPLOAD_FIELD, operation.checkLine).then(
      (prepared) => {
        const upload: StreamedDataset = { datasetId, prepared, rawSha256: raw.digest('hex'), claimed: false };
        // A request that ends before the route claims the file (a validation error, a dropped
        // connection) must not leave the part behind.
        req.res?.once('close', () => {
          if (!upload.claimed) void prepared.part.discard();
        });
        cb(null, { upload });
      },
      (err: unknown) => {
        if (!(err instanceof ApiError)) {
          cb(err as Error);
          return;
        }
        // Refused (a bad line, past the quota): read the rest without storing it, then answer.
        file.stream.resume();
        cb(null, { refusal: err });
      },
    );
  }

  _removeFile(_req: Request, file: DatasetUploadFile, cb: (err: Error | null) => void): void {
    if (!file.upload) {
      cb(null);
      return;
    }
    file.upload.prepared.part.discard().then(() => cb(null), cb);
  }
}
