// How long the demo's token check takes per request: jwtAuth on an HS256 and
// an ES256 token, 2,000 checks each after a warm-up. Run by bench/private.mjs
// under Deno and Bun; prints one JSON line.
import * as jose from "jose";
import { jwtAuth } from "../mod.ts";

const COUNT = 2000;
const secret = "a benchmark secret of at least 32 bytes";
const claims = { sse: { subscribe: ["user/42/*"], publish: ["user/42/*"] } };
const es = await jose.generateKeyPair("ES256", { extractable: true });
const cases = {
  HS256: {
    authorize: await jwtAuth({ secret }),
    token: await new jose.SignJWT(claims).setProtectedHeader({ alg: "HS256" })
      .sign(new TextEncoder().encode(secret)),
  },
  ES256: {
    authorize: await jwtAuth({ publicKey: await jose.exportSPKI(es.publicKey) }),
    token: await new jose.SignJWT(claims).setProtectedHeader({ alg: "ES256" }).sign(es.privateKey),
  },
};
const result: Record<string, number> = {};
for (const [alg, { authorize, token }] of Object.entries(cases)) {
  const request = new Request("http://x/events", { headers: { cookie: `sse_token=${token}` } });
  for (let i = 0; i < 200; i++) await authorize(request, "subscribe");
  const started = performance.now();
  for (let i = 0; i < COUNT; i++) await authorize(request, "subscribe");
  result[alg] = Math.round((performance.now() - started) / COUNT * 1000); // µs
}
console.log(JSON.stringify(result));
