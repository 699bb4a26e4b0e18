// A Node `http` server, unchanged by the dispatcher: examples/apps/node.toml
// runs it in a `proxy` pool. It listens where its environment says: an
// inherited socket (LISTEN_FDS, fd 3, systemd style), a Unix socket path
// (SOCKET) or a port (PORT, default 3000) — so it runs the same on its own.
'use strict';
const http = require('http');
const crypto = require('crypto');

function reply(res, status, body, type = 'text/plain; charset=utf-8') {
  res.writeHead(status, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/') {
    return reply(res, 200, `Hello from Node ${process.version} (pid ${process.pid}) in a dispatcher pool\n`);
  }
  if (url.pathname === '/headers') {
    return reply(res, 200, JSON.stringify(req.headers) + '\n', 'application/json');
  }
  if (url.pathname === '/pid') {
    return reply(res, 200, `${process.pid}\n`);
  }
  if (url.pathname === '/upload' && (req.method === 'POST' || req.method === 'PUT')) {
    // Read as it streams in; answer its length and SHA-256.
    const h = crypto.createHash('sha256');
    let n = 0;
    req.on('data', (c) => { n += c.length; h.update(c); });
    req.on('end', () => reply(res, 200, JSON.stringify({ bytes: n, sha256: h.digest('hex') }) + '\n', 'application/json'));
    return;
  }
  const m = url.pathname.match(/^\/bytes\/(\d+)$/);
  if (m) {
    // N bytes (at most 64 MiB) of (i % 65536) % 251, streamed without a
    // Content-Length (chunked).
    let left = Math.min(Number(m[1]), 64 << 20);
    const block = Buffer.alloc(65536, 0).map((_, i) => i % 251);
    res.writeHead(200, { 'Content-Type': 'application/octet-stream' });
    const more = () => {
      while (left > 0) {
        const part = block.subarray(0, Math.min(left, block.length));
        left -= part.length;
        if (!res.write(part)) return res.once('drain', more);
      }
      res.end();
    };
    return more();
  }
  if (url.pathname === '/ws') {
    return reply(res, 426, 'a WebSocket endpoint: send Upgrade: websocket\n');
  }
  reply(res, 404, 'not found\n');
});

// /ws: a WebSocket echo (RFC 6455), by hand to need no package: each text
// or binary message comes back as it went; a close is answered and ends it;
// the text `bye` makes the server close.
server.on('upgrade', (req, socket, head) => {
  const key = req.headers['sec-websocket-key'];
  if (new URL(req.url, 'http://x').pathname !== '/ws' || !key || !/websocket/i.test(req.headers.upgrade || '')) {
    socket.end('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
    return;
  }
  const accept = crypto.createHash('sha1').update(key + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  socket.write(`HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ${accept}\r\n\r\n`);
  let buf = head;
  const frame = (op, payload) => {
    const len = payload.length;
    const hdr = len < 126 ? Buffer.from([0x80 | op, len])
      : len < 65536 ? Buffer.from([0x80 | op, 126, len >> 8, len & 255])
        : Buffer.concat([Buffer.from([0x80 | op, 127]), (() => { const b = Buffer.alloc(8); b.writeBigUInt64BE(BigInt(len)); return b; })()]);
    socket.write(Buffer.concat([hdr, payload]));
  };
  socket.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      if (buf.length < 2) return;
      const op = buf[0] & 15;
      let len = buf[1] & 127;
      let at = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); at = 4; }
      else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); at = 10; }
      const masked = (buf[1] & 128) !== 0;
      const end = at + (masked ? 4 : 0) + len;
      if (buf.length < end) return;
      const payload = Buffer.from(buf.subarray(end - len, end));
      if (masked) for (let i = 0; i < len; i++) payload[i] ^= buf[at + (i & 3)];
      buf = buf.subarray(end);
      if (op === 8) { frame(8, payload.subarray(0, 2)); socket.end(); return; }
      if (op === 1 && payload.toString() === 'bye') { frame(8, Buffer.from([3, 232])); socket.end(); return; }
      if (op === 9) frame(10, payload);
      else if (op === 1 || op === 2) frame(op, payload);
    }
  });
  socket.on('error', () => socket.destroy());
});

server.keepAliveTimeout = 75000;
if (process.env.LISTEN_FDS === '1' && String(process.pid) === process.env.LISTEN_PID) {
  server.listen({ fd: 3 });
} else if (process.env.SOCKET) {
  server.listen(process.env.SOCKET);
} else {
  server.listen(Number(process.env.PORT || 3000), process.env.HOST || '127.0.0.1');
}
process.on('SIGTERM', () => server.close(() => process.exit(0)));
