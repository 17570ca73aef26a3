// Loaded into configurable-http-proxy before its own code (`node --require <this file> <chp>`):
// what the suite needs of its servers that the proxy has no option for. control.services runs
// the proxy this way and passes the bounds in the environment (CHP_EDGE_*).
//
// 1. A server that cannot listen ends the process. configurable-http-proxy logs an uncaught
//    exception and carries on once it has started, so a public port held by another program
//    left it running with its API up and no public port: ready to every check that asks the
//    API. Ended, it is started again by supervisord through control.launch, which waits until
//    the port is free.
// 2. Its HTTP servers get a deadline for a request's head (CHP_EDGE_HEADER_TIMEOUT_MS; node
//    checks it every second instead of every 30 s), at most CHP_EDGE_MAX_HEADERS header fields,
//    and, on the public port (CHP_EDGE_PUBLIC_PORT), at most CHP_EDGE_PER_CLIENT connections
//    open from one address at once: one more is answered 429 and closed before node's HTTP
//    server sees it. Addresses in CHP_EDGE_TRUSTED (trusted proxies, which carry many clients)
//    are not counted. Upgraded connections (websockets: kernels) count as connections and have
//    no idle deadline.
//
// Node's own options were preferred to kernel rules (iptables connlimit): they need no root and
// no host-wide state shared by every suite on the host, and they answer with a status. Measured
// cost: see the README ("Proxy bounds").
"use strict";

const http = require("http");
const net = require("net");

const env = (name, fallback) => {
  const value = Number.parseInt(process.env[name] || "", 10);
  return Number.isFinite(value) && value > 0 ? value : fallback;
};
const HEADER_TIMEOUT_MS = env("CHP_EDGE_HEADER_TIMEOUT_MS", 10000);
const MAX_HEADERS = env("CHP_EDGE_MAX_HEADERS", 100);
const PER_CLIENT = env("CHP_EDGE_PER_CLIENT", 0);
const PUBLIC_PORT = env("CHP_EDGE_PUBLIC_PORT", 0);

const trusted = new net.BlockList();
for (const item of (process.env.CHP_EDGE_TRUSTED || "").split(",").filter(Boolean)) {
  const [address, bits] = item.trim().split("/");
  const type = net.isIPv6(address) ? "ipv6" : "ipv4";
  if (bits === undefined) trusted.addAddress(address, type);
  else trusted.addSubnet(address, Number.parseInt(bits, 10), type);
}

const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  this.on("error", (error) => {
    if (this.listening) {
      console.error(`proxy: server error: ${error.message}`);
      return;
    }
    console.error(`proxy: cannot listen (${error.code || error.message}); exiting`);
    process.exit(1);
  });
  this.once("listening", () => {
    const address = this.address();
    if (PER_CLIENT && address && address.port === PUBLIC_PORT) boundPerClient(this);
  });
  return listen.apply(this, args);
};

const createServer = http.createServer;
http.createServer = function (options, handler) {
  if (typeof options === "function" || options === undefined) [options, handler] = [{}, options];
  const bounded = {
    ...options,
    headersTimeout: HEADER_TIMEOUT_MS,
    requestTimeout: Math.max(options.requestTimeout ?? 300000, HEADER_TIMEOUT_MS + 1000),
    connectionsCheckingInterval: Math.min(1000, HEADER_TIMEOUT_MS),
  };
  const server = createServer.call(this, bounded, handler);
  server.maxHeadersCount = MAX_HEADERS;
  return server;
};

function plain(address) {
  return address && address.startsWith("::ffff:") ? address.slice(7) : address || "";
}

function exempt(address) {
  const type = net.isIPv6(address) ? "ipv6" : "ipv4";
  try {
    return trusted.check(address, type);
  } catch {
    return false;
  }
}

function boundPerClient(server) {
  const open = new Map();
  const body = JSON.stringify({
    type: "rateLimited",
    error: `this client has ${PER_CLIENT} connections open: close one first`,
  });
  const refusal =
    "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 1\r\n" +
    `content-length: ${Buffer.byteLength(body)}\r\nconnection: close\r\n\r\n${body}`;
  const emit = server.emit;
  server.emit = function (event, socket, ...rest) {
    if (event !== "connection") return emit.call(this, event, socket, ...rest);
    const address = plain(socket.remoteAddress);
    const held = open.get(address) || 0;
    if (held >= PER_CLIENT && !exempt(address)) {
      socket.on("error", () => {});
      socket.setTimeout(1000, () => socket.destroy());
      socket.end(refusal);
      socket.resume(); // what it sends is dropped, so that it reads the answer
      return true;
    }
    open.set(address, held + 1);
    socket.once("close", () => {
      const left = (open.get(address) || 1) - 1;
      if (left > 0) open.set(address, left);
      else open.delete(address);
    });
    return emit.call(this, event, socket, ...rest);
  };
}
