# workerd's own configuration, to run the example without wrangler:
#   npx esbuild --bundle --format=esm worker.ts --outfile=worker.js
#   npx workerd serve config.capnp
# It serves on 127.0.0.1:8787 and keeps each broker's and each stream's SQLite
# file in ./storage.
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (
  services = [
    (name = "main", worker = .broker),
    (name = "storage", disk = (path = "storage", writable = true)),
  ],
  sockets = [(name = "http", address = "127.0.0.1:8787", http = (), service = "main")],
);

const broker :Workerd.Worker = (
  modules = [(name = "worker.js", esModule = embed "worker.js")],
  compatibilityDate = "2026-11-01",
  # request.signal fires when a client leaves (the default from 2026-11-17).
  compatibilityFlags = ["enable_request_signal"],
  bindings = [
    (name = "BROKER", durableObjectNamespace = "BrokerObject"),
    (name = "STREAMS", durableObjectNamespace = "StreamObject"),
    (name = "HEARTBEAT_MS", fromEnvironment = "HEARTBEAT_MS"),
    (name = "HISTORY", fromEnvironment = "HISTORY"),
    (name = "PUBLISH_TOKEN", fromEnvironment = "PUBLISH_TOKEN"),
    (name = "SUBSCRIBE_TOKEN", fromEnvironment = "SUBSCRIBE_TOKEN"),
    (name = "STREAMS_LONG_POLL_MS", fromEnvironment = "STREAMS_LONG_POLL_MS"),
  ],
  durableObjectNamespaces = [
    (className = "BrokerObject", uniqueKey = "sse-broker", enableSql = true),
    (className = "StreamObject", uniqueKey = "sse-broker-streams", enableSql = true),
  ],
  durableObjectStorage = (localDisk = "storage"),
);
