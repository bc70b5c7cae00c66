// Auth off (dev mode): a shorter smoke run with usernames, on two replicas.
// Env (set by run.sh): E2E_DEV_A, E2E_DEV_B (replica base URLs).

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import * as e2e from "./lib.mjs";

const A = e2e.env("E2E_DEV_A");
const B = e2e.env("E2E_DEV_B");
const TEST = { timeout: 60000 };

describe("dev mode (usernames, no auth)", () => {
  let browser;
  let alice;
  let bob;
  let bobSocket;
  const channel = e2e.uniqueChannel("dev");

  before(async () => {
    browser = await e2e.launch({ fakeMicrophone: true });
    alice = await e2e.newPage(browser);
    bob = await e2e.newPage(browser, { permissions: ["microphone"] });
    // bob's sockets pass through the test, which can inject server frames.
    await bob.routeWebSocket(/\/ws\/chat/, (ws) => {
      const server = ws.connectToServer();
      ws.onMessage((message) => server.send(message));
      server.onMessage((message) => ws.send(message));
      bobSocket = ws;
    });
  });

  after(async () => {
    await browser?.close();
  });

  test("the page asks for a username when auth is off", TEST, async () => {
    const config = await (await fetch(`${A}/app/config.json`)).json();
    assert.deepEqual(config, { auth: false });
    await alice.goto(`${A}/app/`);
    await alice.getByTestId("login-username").waitFor();
    assert.equal(await alice.getByTestId("login-token").isVisible(), false);
    // Invalid names are refused before any connection is tried.
    await alice.getByTestId("login-username").fill("no spaces");
    await alice.getByTestId("login-submit").click();
    await alice.getByTestId("login-error").waitFor();
  });

  test("two users chat across replicas: presence, typing, text, markup as text", TEST, async () => {
    await e2e.join(alice, A, { username: "alice", channel });
    await e2e.join(bob, B, { username: "bob", channel });
    await e2e.waitOnline(alice, ["alice", "bob"]);
    await e2e.waitOnline(bob, ["alice", "bob"]);

    await bob.getByTestId("message-input").pressSequentially("hi al");
    await alice.waitForFunction(() =>
      (document.querySelector('[data-testid="typing"]').dataset.users ?? "").split(" ").includes("bob"),
    );
    await e2e.sendText(bob, "hi alice");
    await e2e.waitForText(alice, "hi alice", { sender: "bob" });

    const payload = 'markup: <img src=x onerror="window.__xss=1"> & <b>bold</b>';
    const sent = await e2e.sendRaw(alice, payload);
    assert.ok(sent.id, `not stored: ${sent.error}`);
    const seen = await e2e.shownText(bob, sent.id);
    // As sent, or sanitized by the server (tags dropped): text either way.
    assert.ok(seen === payload || (seen.startsWith("markup: ") && !seen.includes("<")), seen);
    assert.equal(await bob.evaluate(() => window.__xss), undefined);
  });

  test("an SVG sent as an image is refused, or shown as [invalid media]", TEST, async (t) => {
    const response = await alice.evaluate(async (ch) => {
      const r = await fetch("/api/chat/message", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({
          sender: "alice",
          channel: ch,
          message_type: "image",
          content: "data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9IndpbmRvdy5fX3hzcz00Ii8+",
        }),
      });
      return { status: r.status, body: await r.json() };
    }, channel);
    t.diagnostic(`POST answered ${response.status} ${JSON.stringify(response.body)}`);
    if (response.status === 200) {
      // The server checked only the data-URL header: the client must refuse to render it.
      const id = response.body.data.message_id;
      await bob.waitForSelector(
        `[data-testid="message"][data-message-id="${id}"] [data-testid="message-invalid-media"]`,
      );
    } else {
      assert.equal(response.status, 422, JSON.stringify(response.body));
    }
  });

  test("frames the server would never send are still rendered safely", TEST, async () => {
    // Forged server frames, injected into bob's socket: the client must not rely on the
    // server's checks (legacy history, an older or compromised replica).
    const frame = (id, fields) => ({
      type: "message",
      sender: "alice",
      channel,
      message_type: "text",
      timestamp: new Date().toISOString(),
      message_id: `forged-${id}`,
      ...fields,
    });
    const tiny = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
    const invalid = [
      frame("svg", { message_type: "image", content: "data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9IndpbmRvdy5fX3hzcz00Ii8+" }),
      frame("remote", { message_type: "image", content: "https://tracker.example/pixel.png" }),
      frame("script-url", { message_type: "image", content: "javascript:window.__xss=5" }),
      frame("params", { message_type: "audio", content: "data:audio/webm;codecs=opus;base64,GkXfow==" }),
      frame("suffix", { message_type: "image", content: `data:image/png;base64,${tiny}" onerror="window.__xss=6` }),
    ];
    const textual = [
      frame("raw", { content: "<b>legacy raw</b> <img src=x onerror=window.__xss=7>" }),
      frame("escaped", { content: "a &lt;b&gt; &amp; &quot;c&quot; &#39;d&#39;" }),
      frame("sender", { sender: "<img src=x onerror=window.__xss=8>", content: "odd sender" }),
    ];
    for (const f of [...invalid, ...textual]) bobSocket.send(JSON.stringify(f));

    for (const f of invalid) {
      await bob.waitForSelector(
        `[data-message-id="${f.message_id}"] [data-testid="message-invalid-media"]`,
      );
    }
    const shown = async (id) =>
      bob.locator(`[data-message-id="forged-${id}"] [data-testid="message-text"]`).textContent();
    assert.equal(await shown("raw"), "<b>legacy raw</b> <img src=x onerror=window.__xss=7>");
    assert.equal(await shown("escaped"), `a <b> & "c" 'd'`);
    assert.equal(
      await bob.locator('[data-message-id="forged-sender"] [data-testid="message-sender"]').textContent(),
      "<img src=x onerror=window.__xss=8>",
    );
    assert.equal(await bob.evaluate(() => window.__xss), undefined);
    assert.equal(
      await bob.$$eval('[data-testid="messages"] img:not([data-testid="message-image"]), [data-testid="messages"] b', (n) => n.length),
      0,
    );
  });

  test("a recorded voice message plays on the other page", TEST, async () => {
    const record = bob.getByTestId("record-button");
    await record.click();
    await bob.waitForSelector('[data-testid="record-button"][aria-pressed="true"]');
    // Stop only once audio has been captured: a recording stopped within milliseconds
    // holds too little to decode.
    await bob.waitForSelector('[data-testid="record-button"][data-recorded="true"]');
    await record.click();
    await bob.waitForSelector('[data-testid="record-button"][aria-pressed="false"]');
    const audio = await alice.waitForFunction(() => {
      const element = document.querySelector(
        '[data-testid="message"][data-sender="bob"] audio[data-testid="message-audio"]',
      );
      // readyState >= 1: the browser decoded the recording's metadata.
      return element && element.readyState >= 1 ? element.getAttribute("src").slice(0, 24) : false;
    });
    assert.match(await audio.jsonValue(), /^data:audio\/(webm|ogg|mp4);base64,/);
  });

  test("deleting a message removes it on the other replica's page", TEST, async () => {
    const id = await e2e.sendText(alice, "delete me");
    const selector = `[data-testid="message"][data-message-id="${id}"]`;
    await bob.waitForSelector(selector);
    await alice.locator(`${selector} [data-testid="message-delete"]`).click();
    await bob.waitForSelector(selector, { state: "detached" });
  });

  test("switching channels: free entry, then back through the channel list", TEST, async () => {
    const other = `${channel}-b`;
    await alice.getByTestId("channel-input").fill(other);
    await alice.getByTestId("channel-join").click();
    await alice.waitForFunction(
      (name) => document.querySelector('[data-testid="channel-title"]').textContent === name,
      other,
    );
    await e2e.waitConnected(alice);
    await bob.waitForSelector('[data-testid="online-user"][data-username="alice"]', { state: "detached" });
    const id = await e2e.sendText(alice, "in the other channel");
    assert.deepEqual(await e2e.messageIds(alice), [id], "only the new channel's history");

    await alice.locator(`[data-testid="channel-item"][data-channel="${channel}"]`).click();
    await e2e.waitConnected(alice);
    await e2e.waitForText(alice, "hi alice", { sender: "bob" });
    await bob.waitForSelector('[data-testid="online-user"][data-username="alice"]');
    assert.equal(await alice.locator(`[data-message-id="${id}"]`).count(), 0);
  });

  test("no page broke the Content-Security-Policy or threw", TEST, () => {
    for (const page of [alice, bob]) {
      assert.deepEqual(e2e.cspViolations(page), []);
      assert.deepEqual(
        page.problems.filter((p) => p.startsWith("pageerror")),
        [],
      );
    }
  });
});
