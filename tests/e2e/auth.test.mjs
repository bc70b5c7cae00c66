// Auth on (HS256): two users on two replicas sharing one Redis, in headless Chromium.
// Env (set by run.sh): E2E_AUTH_A, E2E_AUTH_B (replica base URLs), E2E_SECRET.

import assert from "node:assert/strict";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import * as e2e from "./lib.mjs";

const A = e2e.env("E2E_AUTH_A");
const B = e2e.env("E2E_AUTH_B");
const SECRET = e2e.env("E2E_SECRET");
const TEST = { timeout: 60000 };

const XSS = [
  '<img src=x onerror="window.__xss=1">',
  "<script>window.__xss=2</script>",
  '"><svg onload="window.__xss=3">',
];

describe("auth mode (bearer tokens, two replicas)", () => {
  let browser;
  let alice;
  let bob;
  const pages = [];
  const channel = e2e.uniqueChannel("e2e");
  const token = (name, options) => e2e.mintToken(SECRET, name, options);

  before(async () => {
    browser = await e2e.launch();
    alice = await e2e.newPage(browser);
    bob = await e2e.newPage(browser);
    pages.push(alice, bob);
  });

  after(async () => {
    await browser?.close();
  });

  test("the page asks for a token when auth is on", TEST, async () => {
    const config = await (await fetch(`${A}/app/config.json`)).json();
    assert.deepEqual(config, { auth: true });
    // Through the whole middleware stack: the page keeps its own policy.
    const html = await fetch(`${A}/app/`);
    assert.equal(html.headers.get("content-type"), "text/html; charset=utf-8");
    assert.equal(html.headers.get("cache-control"), "no-cache");
    assert.equal(
      html.headers.get("content-security-policy"),
      "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
        "media-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    );
    const redirect = await fetch(`${A}/app`, { redirect: "manual" });
    assert.equal(redirect.status, 308);
    assert.equal(redirect.headers.get("location"), "/app/");
    await alice.goto(`${A}/app/`);
    await alice.getByTestId("login-token").waitFor();
    assert.equal(await alice.getByTestId("login-username").isVisible(), false);
  });

  test("a. two users on two replicas: presence, typing, text and an image", TEST, async () => {
    await e2e.join(alice, A, { token: token("alice"), channel });
    await e2e.join(bob, B, { token: token("bob"), channel });
    assert.equal(await e2e.me(alice), "alice");
    assert.equal(await e2e.me(bob), "bob");
    await e2e.waitOnline(alice, ["alice", "bob"]);
    await e2e.waitOnline(bob, ["alice", "bob"]);

    await alice.getByTestId("message-input").pressSequentially("hello b");
    await bob.waitForFunction(() =>
      (document.querySelector('[data-testid="typing"]').dataset.users ?? "").split(" ").includes("alice"),
    );
    assert.match(await bob.getByTestId("typing").textContent(), /alice is typing/);

    const text = "hello bob, from replica 1";
    const id = await e2e.sendText(alice, text);
    assert.equal(await e2e.waitForText(bob, text, { sender: "alice" }), id);
    // The message turns alice's indicator off.
    await bob.waitForFunction(() => document.querySelector('[data-testid="typing"]').dataset.active === "0");

    await bob.getByTestId("image-input").setInputFiles({
      name: "gradient.png",
      mimeType: "image/png",
      buffer: e2e.makePng(48),
    });
    const width = await alice.waitForFunction(() => {
      const images = document.querySelectorAll(
        '[data-testid="message"][data-sender="bob"] img[data-testid="message-image"]',
      );
      const loaded = [...images].find((img) => img.complete && img.naturalWidth > 0);
      return loaded ? loaded.naturalWidth : false;
    });
    assert.equal(await width.jsonValue(), 48);
  });

  test("b. markup in messages is shown as text and never runs", TEST, async (t) => {
    for (const [index, payload] of XSS.entries()) {
      const marker = `xss-${index + 1}:`;
      const sent = await e2e.sendRaw(alice, `${marker} ${payload}`);
      assert.ok(sent.id, `not stored: ${sent.error}`);
      const seen = await e2e.shownText(bob, sent.id);
      t.diagnostic(`${JSON.stringify(payload)} is shown as ${JSON.stringify(seen)}`);
      assert.equal(seen, await e2e.shownText(alice, sent.id), "both pages show the same text");
      assert.ok(seen.startsWith(marker), seen);
      // Stored as sent (then shown verbatim, as text), or sanitized by the server (tags
      // dropped, the rest escaped and decoded back to text).
      assert.ok(seen === `${marker} ${payload}` || !seen.includes("<"), seen);
    }
    // Text the server's sanitizer keeps as is round-trips exactly.
    const plain = `a < b & c "quoted" 'single' > done`;
    await e2e.sendText(alice, plain);
    await e2e.waitForText(bob, plain, { sender: "alice" });
    for (const page of [alice, bob]) {
      assert.equal(await page.evaluate(() => window.__xss), undefined);
      const injected = await page.$$eval(
        '[data-testid="messages"] script, [data-testid="messages"] svg, [data-testid="messages"] img:not([data-testid="message-image"])',
        (nodes) => nodes.length,
      );
      assert.equal(injected, 0);
    }
  });

  test("c. a page from another origin cannot open a socket with a valid token; the client's own page can", TEST, async () => {
    const foreign = await e2e.startForeignOrigin();
    try {
      const page = await e2e.newPage(browser);
      await page.goto(`${foreign.url}/`);
      await page.waitForFunction(() => typeof window.probe === "function");
      const url = `${A.replace(/^http/, "ws")}/ws/chat?channel=${channel}-probe`;
      const protocols = ["chatgate.v1", `bearer.${token("carol")}`];

      const fromForeign = await page.evaluate((arg) => window.probe(arg), { url, protocols });
      const fromOwn = await alice.evaluate(e2e.probe, { url, protocols });
      await page.context().close();
      // Same-origin first: if it fails, the problem is not the Origin check.
      assert.deepEqual(fromOwn, { opened: true, protocol: "chatgate.v1" }, "from chatgate's own page");
      assert.equal(fromForeign.opened, false, `from ${foreign.url}: ${JSON.stringify(fromForeign)}`);
    } finally {
      await foreign.close();
    }
  });

  test("c'. the upgrade answers: chatgate.v1 selected, token not echoed; 403 for a foreign Origin", TEST, async () => {
    const jwt = token("carol");
    const headers = { "Sec-WebSocket-Protocol": `chatgate.v1, bearer.${jwt}` };
    const pathAndQuery = `/ws/chat?channel=${channel}-raw`;
    const own = await e2e.rawUpgrade(A, pathAndQuery, { ...headers, Origin: A });
    assert.equal(own.status, 101);
    assert.equal(own.headers["sec-websocket-protocol"], "chatgate.v1");
    assert.ok(!JSON.stringify(own.headers).includes(jwt), "the token is echoed in the 101");
    const foreign = await e2e.rawUpgrade(A, pathAndQuery, { ...headers, Origin: "http://evil.example" });
    assert.equal(foreign.status, 403);
    const anonymous = await e2e.rawUpgrade(A, pathAndQuery, { Origin: A });
    assert.equal(anonymous.status, 401);
  });

  test("d. a deleted message disappears on the other replica's page", TEST, async () => {
    const text = "this one will be deleted";
    const id = await e2e.sendText(alice, text);
    await e2e.waitForText(bob, text, { sender: "alice" });
    const selector = `[data-testid="message"][data-message-id="${id}"]`;
    // Only the author (or an admin) gets a delete button.
    assert.equal(await bob.locator(`${selector} [data-testid="message-delete"]`).count(), 0);
    await alice.locator(`${selector} [data-testid="message-delete"]`).click();
    await bob.waitForSelector(selector, { state: "detached" });
    await alice.waitForSelector(selector, { state: "detached" });
  });

  test("messages missed while disconnected are merged once after a reconnect", TEST, async () => {
    const dave = await e2e.newPage(browser);
    pages.push(dave);
    // Route dave's sockets through the test, to lose frames and close like a draining server.
    let dropping = false;
    let current = null;
    await dave.routeWebSocket(/\/ws\/chat/, (ws) => {
      const server = ws.connectToServer();
      ws.onMessage((message) => server.send(message));
      server.onMessage((message) => {
        if (!dropping) ws.send(message);
      });
      current = { ws, server };
    });
    await e2e.join(dave, B, { token: token("dave"), channel });
    await e2e.waitForText(dave, "hello bob, from replica 1", { sender: "alice" });
    const before = await e2e.messageIds(dave);

    dropping = true;
    const missed = ["sent while dave was away 1", "sent while dave was away 2"];
    for (const text of missed) await e2e.sendText(alice, text);
    const old = current;
    dropping = false;
    await old.ws.close({ code: 1001, reason: "server shutting down, reconnect" });
    await old.server.close().catch(() => {});

    for (const text of missed) await e2e.waitForText(dave, text, { sender: "alice" });
    await e2e.waitConnected(dave);
    assert.notEqual(current, old, "dave reconnected on a new socket");
    const live = "sent after dave came back";
    await e2e.sendText(alice, live);
    await e2e.waitForText(dave, live, { sender: "alice" });

    const ids = await e2e.messageIds(dave);
    assert.equal(new Set(ids).size, ids.length, "no message is shown twice");
    assert.deepEqual(ids.slice(0, before.length), before, "earlier messages kept, in order");
    assert.equal(ids.length, before.length + missed.length + 1);

    // A 1008 (token expired or refused) asks for a new token; pasting one reconnects.
    await current.ws.close({ code: 1008, reason: "token expired" });
    await dave.getByTestId("login-token").waitFor();
    assert.equal(await dave.getByTestId("login-error").isVisible(), true);
    await dave.getByTestId("login-token").fill(token("dave"));
    await dave.getByTestId("login-submit").click();
    await e2e.waitConnected(dave);
    await e2e.waitForText(dave, live, { sender: "alice" });
  });

  test("a token about to expire asks for a new one, and the new one reconnects", TEST, async () => {
    const erin = await e2e.newPage(browser);
    pages.push(erin);
    const sockets = [];
    erin.on("websocket", (ws) => sockets.push(ws));
    await e2e.join(erin, A, { token: token("erin", { ttlSecs: 6 }), channel });
    await erin.getByTestId("token-renew").waitFor();
    assert.match(await erin.getByTestId("token-renew-text").textContent(), /expires/);
    await erin.getByTestId("token-renew-input").fill(token("erin"));
    await erin.getByTestId("token-renew").getByRole("button").click();
    await erin.getByTestId("token-renew").waitFor({ state: "hidden" });
    await e2e.waitConnected(erin);
    if (!sockets[0].isClosed()) await sockets[0].waitForEvent("close");
    assert.equal(sockets.length, 2, "one new socket, with the new token");
    const text = "erin's token was renewed";
    await e2e.sendText(erin, text);
    await e2e.waitForText(alice, text, { sender: "erin" });
  });

  test("e. screenshots (desktop and phone)", TEST, async () => {
    await bob.screenshot({ path: path.join(e2e.ARTIFACTS, "chat.png") });

    const phone = await e2e.newPage(browser, {
      viewport: { width: 390, height: 844 },
      deviceScaleFactor: 2,
      isMobile: true,
      hasTouch: true,
    });
    pages.push(phone);
    await e2e.join(phone, A, { token: token("frank"), channel });
    await e2e.waitForText(phone, "sent after dave came back", { sender: "alice" });
    const layout = await phone.evaluate(() => {
      const rect = (id) => document.querySelector(`[data-testid="${id}"]`).getBoundingClientRect();
      return {
        overflow: document.documentElement.scrollWidth > window.innerWidth,
        sidebarRight: rect("sidebar").right,
        composerBottom: rect("composer").bottom,
        height: window.innerHeight,
      };
    });
    assert.equal(layout.overflow, false, "no horizontal scrolling on a phone");
    assert.ok(layout.sidebarRight <= 0, "the sidebar is a closed drawer");
    assert.ok(layout.composerBottom <= layout.height + 1, "the composer is on screen");
    await phone.screenshot({ path: path.join(e2e.ARTIFACTS, "chat-phone.png") });
    await phone.getByTestId("menu-toggle").click();
    await phone.waitForFunction(
      () => document.querySelector('[data-testid="sidebar"]').getBoundingClientRect().left >= 0,
    );
    await phone.getByTestId("online-user").first().waitFor();
    await phone.screenshot({ path: path.join(e2e.ARTIFACTS, "chat-phone-menu.png") });
  });

  test("no page broke the Content-Security-Policy or threw", TEST, () => {
    for (const page of pages) {
      assert.deepEqual(e2e.cspViolations(page), []);
      assert.deepEqual(
        page.problems.filter((p) => p.startsWith("pageerror")),
        [],
      );
    }
  });
});
