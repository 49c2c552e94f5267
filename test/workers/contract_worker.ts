// Runs the store contracts in workerd, against the Workers example's stores
// in a Durable Object's own storage: the EventLog contract
// (test/contract/event_log.ts) against SqliteLog, `?contract=log`, and the
// StreamStore contract (test/contract/stream_store.ts) against
// SqliteStreamStore, `?contract=streams`. Each request runs one case, named
// by `&case=<index>`, in an object of its own, and answers {"ok"} or
// {"ok": false, "message"}. Bundled by test/workers_test.ts with esbuild and
// served by config.capnp beside it.
import { eventLogContract, type MakeLog } from "../contract/event_log.ts";
import { type MakeStore, streamStoreContract } from "../contract/stream_store.ts";
import { SqliteLog, type SqlStorageLike } from "../../examples/workers/sqlite_log.ts";
import { SqliteStreamStore } from "../../examples/workers/sqlite_stream_store.ts";

interface Env {
  CONTRACT: {
    idFromName(name: string): unknown;
    get(id: unknown): { fetch(request: Request): Promise<Response> };
  };
}

export default {
  fetch(request: Request, env: Env): Promise<Response> {
    const name = `${new URL(request.url).search}-${crypto.randomUUID()}`;
    return env.CONTRACT.get(env.CONTRACT.idFromName(name)).fetch(request);
  },
};

/** One case of a contract, in storage of its own. */
export class ContractObject {
  readonly #storage: SqlStorageLike;

  constructor(ctx: { storage: SqlStorageLike }) {
    this.#storage = ctx.storage;
  }

  /** Drops the tables that start with `prefix`: each log or store a case makes starts empty. */
  #empty(prefix: string): void {
    const tables = this.#storage.sql.exec(
      "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, length(?)) = ?",
      prefix,
      prefix,
    ).toArray();
    for (const { name } of tables) this.#storage.sql.exec(`DROP TABLE ${name}`);
  }

  async fetch(request: Request): Promise<Response> {
    const params = new URL(request.url).searchParams;
    const index = Number(params.get("case"));
    const makeLog: MakeLog = (options = {}) => {
      this.#empty("sse_");
      return Promise.resolve({ log: new SqliteLog(this.#storage, options), close: () => {} });
    };
    const makeStore: MakeStore = (options = {}) => {
      this.#empty("ds_");
      return Promise.resolve({
        store: new SqliteStreamStore(this.#storage, options),
        close: () => {},
      });
    };
    try {
      if (params.get("contract") === "streams") await streamStoreContract[index].run(makeStore);
      else await eventLogContract[index].run(makeLog);
      return Response.json({ ok: true });
    } catch (error) {
      return Response.json({ ok: false, message: String((error as Error)?.stack ?? error) });
    }
  }
}
