// Helpers shared by the end-to-end suites: browser launch, HS256 tokens, page actions that
// wait for DOM conditions (never fixed sleeps), a second-origin page server, and a raw
// WebSocket handshake for checks a browser cannot see (status codes, response headers).

import assert from "node:assert/strict";
import { createHmac, randomBytes, randomUUID } from "node:crypto";
import http from "node:http";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import zlib from "node:zlib";
import { chromium } from "playwright-core";

/** Longest wait for any one DOM condition. Generous for a loaded 2-core machine. */
export const STEP_MS = 15000;

export const ARTIFACTS = process.env.E2E_ARTIFACTS ?? fileURLToPath(new URL("../../target/e2e", import.meta.url));
mkdirSync(ARTIFACTS, { recursive: true });

export function env(name) {
  const value = process.env[name];
  assert.ok(value, `${name} is not set: run the suites through tests/e2e/run.sh`);
  return value;
}

/** Headless Chromium; `fakeMicrophone` adds a fake audio input (a tone) for MediaRecorder. */
export async function launch({ fakeMicrophone = false } = {}) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--no-first-run",
      ...(fakeMicrophone ? ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"] : []),
    ],
  });
}

/** A page that records console errors and uncaught exceptions (CSP violations among them). */
export async function newPage(browser, { viewport = { width: 1100, height: 760 }, ...options } = {}) {
  const context = await browser.newContext({ viewport, ...options });
  const page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.problems = [];
  page.on("console", (message) => {
    if (message.type() === "error") page.problems.push(`console: ${message.text()}`);
  });
  page.on("pageerror", (error) => page.problems.push(`pageerror: ${error.message}`));
  return page;
}

/** Console errors about the Content-Security-Policy (an inline script or style, a blocked connection). */
export function cspViolations(page) {
  return page.problems.filter((p) => /Content Security Policy/i.test(p));
}

/** An HS256 JWT with the claims chatgate reads. */
export function mintToken(secret, username, { ttlSecs = 900, claims = {} } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const header = part({ alg: "HS256", typ: "JWT" });
  const payload = part({
    sub: `${username}-${randomUUID().slice(0, 8)}`,
    preferred_username: username,
    iat: now,
    exp: now + ttlSecs,
    ...claims,
  });
  const signature = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${signature}`;
}

export function uniqueChannel(prefix) {
  return `${prefix}-${Date.now().toString(36)}-${randomBytes(3).toString("hex")}`;
}

// ------------------------------------------------------------------ page actions

/** Opens the client and joins: with a token (auth on) or a username (auth off). */
export async function join(page, base, { token, username, channel }) {
  await page.goto(`${base}/app/`);
  await page.getByTestId("login-form").waitFor();
  if (token !== undefined) {
    await page.getByTestId("login-token").fill(token);
  } else {
    await page.getByTestId("login-username").fill(username);
  }
  await page.getByTestId("login-channel").fill(channel);
  await page.getByTestId("login-submit").click();
  await waitConnected(page);
}

export async function waitConnected(page) {
  await page.waitForSelector('[data-testid="conn-status"][data-state="online"]');
}

/** Waits until the online list shows every one of `names`. */
export async function waitOnline(page, names) {
  await page.waitForFunction((expected) => {
    const shown = new Set(
      [...document.querySelectorAll('[data-testid="online-user"]')].map((li) => li.dataset.username),
    );
    return expected.every((n) => shown.has(n));
  }, names);
}

/** Types `text` and sends it with Enter; resolves with the stored message's id (from the echo). */
export async function sendText(page, text) {
  const input = page.getByTestId("message-input");
  await input.fill(text);
  await input.press("Enter");
  return waitForText(page, text, { sender: await me(page) });
}

/**
 * Sends `text` and waits for the outcome: { id } of the stored message (its echo), or
 * { error } when the server refused it. For content the server may rewrite (sanitizing),
 * where the shown text cannot be predicted exactly.
 */
export async function sendRaw(page, text) {
  const known = await messageIds(page);
  const input = page.getByTestId("message-input");
  await input.fill(text);
  await input.press("Enter");
  const handle = await page.waitForFunction(
    ([before, sender]) => {
      const failed = document.querySelector('[data-testid="failed-message"]');
      if (failed) return { error: failed.querySelector('[data-testid="pending-note"]')?.textContent ?? "failed" };
      for (const li of document.querySelectorAll('[data-testid="message"]')) {
        if (li.dataset.sender === sender && !before.includes(li.dataset.messageId)) {
          return { id: li.dataset.messageId };
        }
      }
      return false;
    },
    [known, await me(page)],
  );
  return handle.jsonValue();
}

/** The text `page` shows for message `id` (waits until it is shown). */
export async function shownText(page, id) {
  const selector = `[data-testid="message"][data-message-id="${id}"] [data-testid="message-text"]`;
  await page.waitForSelector(selector);
  return page.locator(selector).textContent();
}

export async function me(page) {
  return page.getByTestId("me").textContent();
}

/**
 * Waits until a confirmed message whose text is exactly `text` is shown; returns its
 * message id.
 */
export async function waitForText(page, text, { sender } = {}) {
  const handle = await page.waitForFunction(
    ([expected, from]) => {
      for (const li of document.querySelectorAll('[data-testid="message"]')) {
        if (from && li.dataset.sender !== from) continue;
        const body = li.querySelector('[data-testid="message-text"]');
        if (body && body.textContent === expected) return li.dataset.messageId;
      }
      return false;
    },
    [text, sender],
  );
  return handle.jsonValue();
}

export async function messageIds(page) {
  return page.$$eval('[data-testid="message"]', (items) => items.map((li) => li.dataset.messageId));
}

// ------------------------------------------------------------------ media

const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

function crc32(buffer) {
  let c = 0xffffffff;
  for (const byte of buffer) c = CRC_TABLE[(c ^ byte) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const length = Buffer.alloc(4);
  length.writeUInt32BE(data.length);
  const body = Buffer.concat([Buffer.from(type, "ascii"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(body));
  return Buffer.concat([length, body, crc]);
}

/** A valid RGB PNG of `size`×`size` pixels (a colour gradient). */
export function makePng(size = 48) {
  const header = Buffer.alloc(13);
  header.writeUInt32BE(size, 0);
  header.writeUInt32BE(size, 4);
  header.writeUInt8(8, 8); // bit depth
  header.writeUInt8(2, 9); // colour type: RGB
  const rows = [];
  for (let y = 0; y < size; y++) {
    const row = Buffer.alloc(1 + size * 3); // filter byte 0, then pixels
    for (let x = 0; x < size; x++) {
      row[1 + x * 3] = Math.round((255 * x) / size);
      row[2 + x * 3] = Math.round((255 * y) / size);
      row[3 + x * 3] = 200;
    }
    rows.push(row);
  }
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", header),
    chunk("IDAT", zlib.deflateSync(Buffer.concat(rows))),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

// ------------------------------------------------------------------ a second origin

/**
 * Serves one page and one script from another origin (another port): the script defines
 * `window.probe({ url, protocols })`, which opens a WebSocket and reports whether it opened.
 */
export async function startForeignOrigin() {
  const script = `window.probe = ${probe.toString()};\ndocument.title = "foreign origin";\n`;
  const server = http.createServer((request, response) => {
    if (request.url === "/probe.js") {
      response.writeHead(200, { "Content-Type": "text/javascript; charset=utf-8" });
      response.end(script);
    } else if (request.url === "/") {
      response.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
      response.end('<!doctype html><html><head><script src="/probe.js"></script></head><body>foreign</body></html>');
    } else {
      response.writeHead(404).end();
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return { url: `http://127.0.0.1:${port}`, close: () => new Promise((resolve) => server.close(resolve)) };
}

/**
 * Opens a WebSocket; resolves { opened: true, protocol } on open, or { opened: false, code }
 * on a close before open. Runs inside a page (page.evaluate(probe, { url, protocols })).
 */
export function probe({ url, protocols }) {
  return new Promise((resolve) => {
    let opened = false;
    let ws;
    try {
      ws = new WebSocket(url, protocols);
    } catch (error) {
      resolve({ opened: false, error: String(error) });
      return;
    }
    ws.onopen = () => {
      opened = true;
      resolve({ opened: true, protocol: ws.protocol });
      ws.close(1000);
    };
    ws.onclose = (event) => {
      if (!opened) resolve({ opened: false, code: event.code });
    };
  });
}

// ------------------------------------------------------------------ raw handshake

/**
 * Sends a WebSocket upgrade request and returns { status, headers } of the answer, then
 * drops the connection. For what browsers hide: the status of a refused upgrade and the
 * Sec-WebSocket-Protocol the server selected.
 */
export function rawUpgrade(base, pathAndQuery, headers) {
  return new Promise((resolve, reject) => {
    const request = http.request(`${base}${pathAndQuery}`, {
      headers: {
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": randomBytes(16).toString("base64"),
        ...headers,
      },
      timeout: STEP_MS,
    });
    request.on("upgrade", (response, socket) => {
      socket.destroy();
      resolve({ status: response.statusCode, headers: response.headers });
    });
    request.on("response", (response) => {
      response.resume();
      resolve({ status: response.statusCode, headers: response.headers });
    });
    request.on("timeout", () => request.destroy(new Error("upgrade timed out")));
    request.on("error", reject);
    request.end();
  });
}
