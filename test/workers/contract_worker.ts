// Runs the EventLog contract (test/contract/event_log.ts) in workerd, against
// the Workers example's SqliteLog in a Durable Object's own storage. Each
// request runs one case, named by `?case=<index>`, in an object of its own,
// and answers {"ok"} or {"ok": false, "message"}. Bundled by
// test/workers_test.ts with esbuild and served by config.capnp beside it.
import { eventLogContract, type MakeLog } from "../contract/event_log.ts";
import { SqliteLog, type SqlStorageLike } from "../../examples/workers/sqlite_log.ts";

interface Env {
  CONTRACT: {
    idFromName(name: string): unknown;
    get(id: unknown): { fetch(request: Request): Promise<Response> };
  };
}

export default {
  fetch(request: Request, env: Env): Promise<Response> {
    const name = `${new URL(request.url).searchParams.get("case")}-${crypto.randomUUID()}`;
    return env.CONTRACT.get(env.CONTRACT.idFromName(name)).fetch(request);
  },
};

/** One case of the contract, in storage of its own. */
export class ContractObject {
  readonly #storage: SqlStorageLike;

  constructor(ctx: { storage: SqlStorageLike }) {
    this.#storage = ctx.storage;
  }

  async fetch(request: Request): Promise<Response> {
    const contract = eventLogContract[Number(new URL(request.url).searchParams.get("case"))];
    // Each log a case makes starts empty.
    const make: MakeLog = (options = {}) => {
      for (const table of ["sse_events", "sse_ids", "sse_keys"]) {
        this.#storage.sql.exec(`DROP TABLE IF EXISTS ${table}`);
      }
      return Promise.resolve({ log: new SqliteLog(this.#storage, options), close: () => {} });
    };
    try {
      await contract.run(make);
      return Response.json({ ok: true });
    } catch (error) {
      return Response.json({ ok: false, message: String((error as Error)?.stack ?? error) });
    }
  }
}
