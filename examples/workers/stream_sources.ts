// Forks across Durable Objects: with one object per stream, a fork's source
// lives in another object. The fork's store asks it through `ForkSources`
// (describe, lend, release), which this module carries as requests between
// the objects: `remoteSources` on the fork's side, `serveSource` on the
// source's. The requests go to SOURCE_PATH, outside the streams' prefix:
// the Worker forwards clients' requests under the prefix only, so only
// another object, through its stub, reaches this route.
import { concat } from "../../mod.ts";
import type { Piece } from "../../streams.ts";
import type {
  Described,
  ForkSources,
  LendRequest,
  Lent,
  Refusal,
  SqliteStreamStore,
} from "./sqlite_stream_store.ts";

/** The path of the requests between objects: `<SOURCE_PATH><describe|lend|release>`. */
export const SOURCE_PATH = "/.source/";

/** A Durable Object namespace, as the Worker's bindings give it. */
export interface Namespace {
  idFromName(name: string): unknown;
  get(id: unknown): { fetch(request: Request): Promise<Response> };
}

// A lend's answer is a run of frames, each a kind byte, a 4-byte length and
// its payload: first the lend's outcome (JSON), then one frame per run of
// pieces (each piece its end and batch end as 8-byte floats, its length in
// 4 bytes, its data), then the copy's end (JSON: a refusal or null).
const JSON_FRAME = 0;
const RUN_FRAME = 1;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

function frame(kind: number, payload: Uint8Array): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(5 + payload.length);
  out[0] = kind;
  new DataView(out.buffer).setUint32(1, payload.length);
  out.set(payload, 5);
  return out;
}

function runFrame(run: readonly Piece[]): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const piece of run) {
    const head = new DataView(new ArrayBuffer(20));
    head.setFloat64(0, piece.end);
    head.setFloat64(8, piece.batchEnd);
    head.setUint32(16, piece.data.length);
    parts.push(new Uint8Array(head.buffer), piece.data);
  }
  return frame(RUN_FRAME, concat(parts));
}

function runOf(payload: Uint8Array): Piece[] {
  const view = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const run: Piece[] = [];
  for (let at = 0; at < payload.length;) {
    const length = view.getUint32(at + 16);
    run.push({
      end: view.getFloat64(at),
      batchEnd: view.getFloat64(at + 8),
      data: payload.slice(at + 20, at + 20 + length),
    });
    at += 20 + length;
  }
  return run;
}

/** The frames of a body, each whole, as they arrive. */
async function* frames(body: ReadableStream<Uint8Array>): AsyncGenerator<[number, Uint8Array]> {
  const reader = body.getReader();
  let buffer: Uint8Array = new Uint8Array(0);
  try {
    for (;;) {
      while (buffer.length >= 5) {
        const length = new DataView(buffer.buffer, buffer.byteOffset).getUint32(1);
        if (buffer.length < 5 + length) break;
        yield [buffer[0], buffer.subarray(5, 5 + length)];
        buffer = buffer.subarray(5 + length);
      }
      const { value, done } = await reader.read();
      if (done) {
        if (buffer.length > 0) throw new Error("the source's answer ended within a frame");
        return;
      }
      buffer = concat([buffer, value]);
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * The {@linkcode ForkSources} of one object per stream: each call is a
 * request to the object named by the source's path.
 *
 * @param namespace The objects' namespace (`env.STREAMS`).
 * @returns The sources, for `SqliteStreamStore`'s `sources` option.
 */
export function remoteSources(namespace: Namespace): ForkSources {
  const call = async (path: string, op: string, body: unknown): Promise<Response> => {
    const stub = namespace.get(namespace.idFromName(path));
    const response = await stub.fetch(
      new Request(`https://stream-object${SOURCE_PATH}${op}`, {
        method: "POST",
        body: JSON.stringify({ path, ...body as object }),
      }),
    );
    if (!response.ok) {
      throw new Error(`the source's object answered ${op} with ${response.status}`);
    }
    return response;
  };
  return {
    async describe(path) {
      const { described } = await (await call(path, "describe", {})).json();
      return described ?? undefined;
    },
    async lend(path, request) {
      const response = await call(path, "lend", { request });
      const body = frames(response.body!);
      const first = await body.next();
      if (first.done || first.value[0] !== JSON_FRAME) {
        throw new Error("the source's answer to lend has no outcome");
      }
      const outcome = JSON.parse(decoder.decode(first.value[1])) as Lent<undefined>;
      if (outcome.status !== "lent") {
        await body.return(undefined);
        return outcome;
      }
      async function* runs(): AsyncGenerator<Piece[], Refusal | undefined> {
        for await (const [kind, payload] of body) {
          if (kind === RUN_FRAME) yield runOf(payload);
          else return JSON.parse(decoder.decode(payload)).end ?? undefined;
        }
        throw new Error("the source's answer to lend ended before the copy did");
      }
      return { ...outcome, runs: runs() };
    },
    async release(path, fork, incarnation) {
      await (await call(path, "release", { fork, incarnation })).body?.cancel();
    },
  };
}

/**
 * Answers another object's request to SOURCE_PATH with this object's
 * store: a fork in that object asking its source, here.
 *
 * @param store This object's store.
 * @param request The request.
 * @returns The answer.
 */
export async function serveSource(store: SqliteStreamStore, request: Request): Promise<Response> {
  const op = new URL(request.url).pathname.slice(SOURCE_PATH.length);
  const body = await request.json() as {
    path: string;
    request: LendRequest;
    fork: string;
    incarnation: string;
  };
  switch (op) {
    case "describe": {
      const described: Described | undefined = await store.describe(body.path);
      return Response.json({ described: described ?? null });
    }
    case "release":
      await store.release(body.path, body.fork, body.incarnation);
      return new Response(null, { status: 204 });
    case "lend": {
      const lent = await store.lend(body.path, body.request);
      if (lent.status !== "lent") {
        return new Response(frame(JSON_FRAME, encoder.encode(JSON.stringify(lent))));
      }
      const { runs, ...outcome } = lent;
      let started = false;
      // Each run is read from storage when the fork takes it: a fork of any size costs a run.
      return new Response(
        new ReadableStream<Uint8Array>({
          pull(controller) {
            if (!started) {
              started = true;
              controller.enqueue(frame(JSON_FRAME, encoder.encode(JSON.stringify(outcome))));
              return;
            }
            const step = runs.next();
            if (!step.done) return controller.enqueue(runFrame(step.value));
            const end = JSON.stringify({ end: step.value ?? null });
            controller.enqueue(frame(JSON_FRAME, encoder.encode(end)));
            controller.close();
          },
          cancel() {
            runs.return?.(undefined);
          },
        }),
      );
    }
    default:
      return Response.json({ error: `no such operation: ${op}` }, { status: 404 });
  }
}
