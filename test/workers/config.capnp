# workerd's configuration for the EventLog contract against SqliteLog
# (test/workers/contract_worker.ts, bundled to contract.js by the test).
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "main", worker = .contract),
    (name = "storage", disk = (path = "storage", writable = true)),
  ],
  sockets = [(name = "http", address = "127.0.0.1:0", http = (), service = "main")],
);

const contract :Workerd.Worker = (
  modules = [(name = "contract.js", esModule = embed "contract.js")],
  compatibilityDate = "2026-11-01",
  # node:assert, which the contract's cases use.
  compatibilityFlags = ["nodejs_compat"],
  bindings = [(name = "CONTRACT", durableObjectNamespace = "ContractObject")],
  durableObjectNamespaces = [
    (className = "ContractObject", uniqueKey = "sse-contract", enableSql = true),
  ],
  durableObjectStorage = (localDisk = "storage"),
);
