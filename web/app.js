// chatgate browser client: one ES module, no framework, no build step.
//
// Safety rule for this file: no string from the network or the user ever becomes markup.
// The DOM is built with createElement/textContent/setAttribute only (no innerHTML,
// outerHTML, insertAdjacentHTML or document.write). Text messages arrive as an
// HTML-escaped fragment and are decoded by an inert DOMParser document into plain text;
// media is shown only from data: URLs that match a strict pattern.
//
// Protocol: docs/protocol.md (frames, close codes, REST API).

const MAX_TEXT_BYTES = 4096; // chat.max_text_bytes default
const MAX_MEDIA_BYTES = 1048576; // chat.max_media_bytes default (the whole data: URL)
const HISTORY_LIMIT = 100;
const RECONNECT_BASE_MS = 500;
const RECONNECT_CAP_MS = 30000;
const ECHO_TIMEOUT_MS = 10000;
const TYPING_REFRESH_MS = 3000; // resend typing_start while typing (server TTL is 10 s)
const TYPING_IDLE_MS = 2000; // typing_stop after this long without input
const TYPING_SHOW_MS = 7000; // hide a peer's indicator not refreshed for this long
const ONLINE_REFRESH_DELAY_MS = 150;
const MAX_RECORDING_MS = 60000;
const RECORDING_SLICE_MS = 250;
const TOKEN_RENEW_LEAD_MS = 120000;
const TOAST_MS = 8000;
const MAX_TOASTS = 4;

const USERNAME_MAX = 32;
const CHANNEL_MAX = 64;
// The server's rule: letters and digits of any script (Rust's char::is_alphanumeric:
// Alphabetic or Numeric), plus _ - .
const NAME_RE = /^[\p{Alphabetic}\p{N}_.-]+$/u;
const MESSAGE_ID_RE = /^[A-Za-z0-9-]{1,64}$/;
const IMAGE_RE = /^data:image\/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]+={0,2}$/;
const AUDIO_RE = /^data:audio\/(webm|ogg|mpeg|wav|mp4|aac);base64,[A-Za-z0-9+/]+={0,2}$/;
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];
const JWT_RE = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/;

const TOKEN_KEY = "chatgate.token"; // sessionStorage only
const USERNAME_KEY = "chatgate.username"; // dev mode only
const CHANNEL_KEY = "chatgate.channel";

const $ = (id) => document.getElementById(id);
const ui = {
  login: $("login"),
  loginForm: $("login-form"),
  loginHint: $("login-hint"),
  loginUsernameRow: $("login-username-row"),
  loginUsername: $("login-username"),
  loginTokenRow: $("login-token-row"),
  loginToken: $("login-token"),
  loginChannel: $("login-channel"),
  loginError: $("login-error"),
  loginSubmit: $("login-submit"),
  chat: $("chat"),
  menuToggle: $("menu-toggle"),
  sidebar: $("sidebar"),
  scrim: $("scrim"),
  channelTitle: $("channel-title"),
  connStatus: $("conn-status"),
  me: $("me"),
  logout: $("logout"),
  renew: $("renew"),
  renewText: $("renew-text"),
  renewToken: $("renew-token"),
  channelList: $("channel-list"),
  channelForm: $("channel-form"),
  channelInput: $("channel-input"),
  onlineList: $("online-list"),
  onlineCount: $("online-count"),
  scroller: $("scroller"),
  messages: $("messages"),
  pending: $("pending"),
  typing: $("typing"),
  composer: $("composer"),
  imageInput: $("image-input"),
  record: $("record"),
  messageInput: $("message-input"),
  toasts: $("toasts"),
};

const state = {
  auth: false,
  token: null,
  /**
   * { username, admin, expiresAt (ms or null), channels (null: any; else the allowed
   * names), verified (false: decoded locally because the server has no /api/me) }
   */
  me: null,
  channel: "general",
  ws: null,
  /** Bumped for every socket; events of older sockets are ignored. */
  generation: 0,
  attempt: 0,
  reconnectTimer: null,
  expiryTimers: [],
  /** client_id → { li, timer, content, type } */
  pending: new Map(),
  /** message key → <li> */
  messages: new Map(),
  /** Insertion counter: tells which messages were shown before a history read began. */
  seq: 0,
  online: new Set(),
  onlineTimer: null,
  /** username → timer hiding their indicator */
  typingPeers: new Map(),
  typingOn: false,
  typingSentAt: 0,
  typingIdleTimer: null,
  recorder: null,
};

const parser = new DOMParser();

// ---------------------------------------------------------------- small helpers

function el(tag, className, testId) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (testId) node.setAttribute("data-testid", testId);
  return node;
}

function text(tag, value, className, testId) {
  const node = el(tag, className, testId);
  node.textContent = value;
  return node;
}

function validName(name, max) {
  return typeof name === "string" && NAME_RE.test(name) && [...name].length <= max;
}

function utf8Bytes(s) {
  return new TextEncoder().encode(s).length;
}

function newClientId() {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Decodes a JWT payload for display only (the server verifies the token). */
function decodeJwtPayload(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const padded = part + "=".repeat((4 - (part.length % 4)) % 4);
    const bytes = Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

/**
 * Message text as plain text. Content produced by chatgate is an HTML-escaped fragment
 * (`a &lt; b`), decoded by an inert parser (no script runs, nothing loads). A fragment
 * that still contains "<" was not escaped (history written by the original service):
 * it is already plain text. Either way the result only ever becomes a text node.
 */
function decodeText(content) {
  if (content.includes("<")) return content;
  return parser.parseFromString(`<body>${content}`, "text/html").body.textContent ?? "";
}

function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error ?? new Error("cannot read the file"));
    reader.readAsDataURL(blob);
  });
}

function formatTime(timestamp) {
  const date = new Date(timestamp);
  if (Number.isNaN(date.getTime())) return "";
  const sameDay = date.toDateString() === new Date().toDateString();
  return sameDay
    ? date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    // not JSON
  }
  return `HTTP ${response.status}`;
}

// ---------------------------------------------------------------- toasts

function toast(message, code) {
  const node = el("div", "toast", "error-toast");
  node.setAttribute("role", "status");
  if (code) node.dataset.code = code;
  node.append(text("span", message));
  const close = text("button", "\u00d7", "toast-close");
  close.type = "button";
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", () => node.remove());
  node.append(close);
  ui.toasts.append(node);
  while (ui.toasts.childElementCount > MAX_TOASTS) ui.toasts.firstElementChild.remove();
  setTimeout(() => node.remove(), TOAST_MS);
}

// ---------------------------------------------------------------- REST

class TokenRefused extends Error {}

/** fetch with the bearer token; a 401 in auth mode sends the user back to the token box. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers);
  if (state.auth && state.token) headers.set("Authorization", `Bearer ${state.token}`);
  const response = await fetch(path, { ...options, headers, cache: "no-store" });
  if (response.status === 401 && state.auth) {
    signOut("The server refused your token (expired or invalid). Paste a new one.");
    throw new TokenRefused("token refused");
  }
  return response;
}

/**
 * Checks a pasted token: GET /api/me when the server has it; otherwise (404: an older
 * server) the payload is decoded locally, for display only.
 */
async function identify(rawToken) {
  const token = rawToken.trim().replace(/^Bearer\s+/i, "");
  if (!JWT_RE.test(token)) throw new Error("That does not look like a token (header.payload.signature).");
  const claims = decodeJwtPayload(token);
  let response;
  try {
    response = await fetch("/api/me", { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
  } catch {
    throw new Error("Cannot reach the server.");
  }
  let me;
  if (response.ok) {
    const body = await response.json();
    const expiresAt = Date.parse(body.expires_at);
    const channels = Array.isArray(body.channels) ? body.channels.filter((c) => typeof c === "string") : null;
    me = {
      username: String(body.username ?? ""),
      admin: body.admin === true,
      expiresAt: Number.isNaN(expiresAt) ? claimsExpiry(claims) : expiresAt,
      channels: channels && !channels.includes("*") ? channels : null,
      verified: true,
    };
  } else if (response.status === 401 || response.status === 403) {
    throw new Error(`The server refused this token: ${await errorText(response)}`);
  } else if (response.status === 404 || response.status === 405) {
    if (!claims) throw new Error("Cannot read this token's payload.");
    const name = typeof claims.preferred_username === "string" ? claims.preferred_username : claims.sub;
    me = {
      username: String(name ?? ""),
      admin: false,
      expiresAt: claimsExpiry(claims),
      channels: null,
      verified: false,
    };
  } else {
    throw new Error(`Cannot check the token: ${await errorText(response)}`);
  }
  if (!validName(me.username, USERNAME_MAX)) throw new Error("This token names no valid username.");
  if (me.expiresAt !== null && me.expiresAt <= Date.now()) throw new Error("This token has expired.");
  return { token, me };
}

/** Whether the token lets its holder into `channel` (the server refuses the upgrade otherwise). */
function mayJoin(me, channel) {
  return me.channels === null || me.channels.includes(channel);
}

function claimsExpiry(claims) {
  return claims && typeof claims.exp === "number" ? claims.exp * 1000 : null;
}

// ---------------------------------------------------------------- sign in / out

function showLogin(message) {
  ui.chat.hidden = true;
  ui.login.hidden = false;
  ui.loginUsernameRow.hidden = state.auth;
  ui.loginTokenRow.hidden = !state.auth;
  ui.loginHint.textContent = state.auth
    ? "Paste a bearer token from your identity provider to join."
    : "Development mode: pick a username (there is no authentication).";
  ui.loginChannel.value = state.channel;
  ui.loginError.hidden = !message;
  ui.loginError.textContent = message ?? "";
  ui.loginSubmit.disabled = false;
  (state.auth ? ui.loginToken : ui.loginUsername).focus();
}

async function onLoginSubmit(event) {
  event.preventDefault();
  const channel = ui.loginChannel.value.trim() || "general";
  const fail = (message) => {
    ui.loginError.textContent = message;
    ui.loginError.hidden = false;
    ui.loginSubmit.disabled = false;
  };
  if (!validName(channel, CHANNEL_MAX)) {
    return fail("Channel names are 1 to 64 letters, digits, _, - or .");
  }
  ui.loginSubmit.disabled = true;
  if (state.auth) {
    try {
      const { token, me } = await identify(ui.loginToken.value);
      if (!mayJoin(me, channel)) {
        return fail(`This token does not allow the channel ${channel}; allowed: ${me.channels.join(", ")}.`);
      }
      ui.loginToken.value = "";
      enterChat({ token, me, channel });
    } catch (error) {
      fail(error.message);
    }
  } else {
    const username = ui.loginUsername.value.trim();
    if (!validName(username, USERNAME_MAX)) {
      return fail("Usernames are 1 to 32 letters, digits, _, - or . (no spaces).");
    }
    localStorage.setItem(USERNAME_KEY, username);
    const me = { username, admin: false, expiresAt: null, channels: null, verified: false };
    enterChat({ token: null, me, channel });
  }
}

function enterChat({ token, me, channel }) {
  state.token = token;
  state.me = me;
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  state.channel = channel;
  localStorage.setItem(CHANNEL_KEY, channel);
  ui.login.hidden = true;
  ui.chat.hidden = false;
  ui.me.textContent = me.username;
  ui.me.title = me.verified || !state.auth ? "" : "from the token's payload (the server has no /api/me)";
  ui.renew.hidden = true;
  resetChannelView();
  armExpiry();
  connect();
  ui.messageInput.focus();
}

/** Leaves the chat: closes the socket, forgets the token, shows the login form. */
function signOut(message) {
  disconnect();
  clearExpiry();
  stopRecording(true);
  if (state.auth) sessionStorage.removeItem(TOKEN_KEY);
  state.token = null;
  setStatus("offline");
  showLogin(message);
}

// ---------------------------------------------------------------- token expiry

function clearExpiry() {
  for (const timer of state.expiryTimers) clearTimeout(timer);
  state.expiryTimers = [];
}

function armExpiry() {
  clearExpiry();
  const expiresAt = state.me?.expiresAt;
  if (!state.auth || !expiresAt) return;
  const left = expiresAt - Date.now();
  const renewIn = Math.max(0, left - Math.min(TOKEN_RENEW_LEAD_MS, left / 2));
  const clamp = (ms) => Math.min(ms, 2 ** 31 - 1);
  state.expiryTimers.push(
    setTimeout(() => showRenew(false), clamp(renewIn)),
    setTimeout(() => showRenew(true), clamp(Math.max(0, left))),
  );
}

function showRenew(expired) {
  const at = new Date(state.me.expiresAt).toLocaleTimeString();
  ui.renewText.textContent = expired
    ? `Your token expired at ${at}. Paste a new one to keep chatting.`
    : `Your token expires at ${at}. Paste a new one to stay connected.`;
  ui.renew.hidden = false;
}

async function onRenewSubmit(event) {
  event.preventDefault();
  try {
    const { token, me } = await identify(ui.renewToken.value);
    if (!mayJoin(me, state.channel)) {
      toast(`That token does not allow the channel ${state.channel}.`);
      return;
    }
    ui.renewToken.value = "";
    ui.renew.hidden = true;
    const sameUser = me.username === state.me.username;
    state.token = token;
    state.me = me;
    sessionStorage.setItem(TOKEN_KEY, token);
    ui.me.textContent = me.username;
    armExpiry();
    // Reconnect with the new token before the old one expires; history fills any gap.
    if (!sameUser) resetChannelView();
    connect();
  } catch (error) {
    toast(error.message);
  }
}

// ---------------------------------------------------------------- connection

function setStatus(kind, detail) {
  ui.connStatus.dataset.state = kind;
  const labels = {
    connecting: "connecting…",
    online: "online",
    reconnecting: `reconnecting${detail ? ` in ${Math.ceil(detail / 1000)} s` : "…"}`,
    offline: "offline",
  };
  ui.connStatus.textContent = labels[kind] ?? kind;
}

function disconnect() {
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  state.generation += 1; // events of the old socket are ignored from now on
  const ws = state.ws;
  state.ws = null;
  if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, "bye");
  // Echoes of the old socket are ignored from now on.
  failAllPending(
    "The connection was replaced before the server confirmed this message; it may or may not have been stored.",
  );
  stopTypingLocal();
  clearTypingPeers();
}

function connect() {
  disconnect();
  const generation = state.generation;
  const url = new URL("/ws/chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  if (!state.auth) url.searchParams.set("username", state.me.username);
  url.searchParams.set("channel", state.channel);
  let ws;
  try {
    // With auth the token travels in Sec-WebSocket-Protocol (never in the URL); the
    // server selects chatgate.v1 and does not echo the token.
    ws = state.auth ? new WebSocket(url, ["chatgate.v1", `bearer.${state.token}`]) : new WebSocket(url);
  } catch (error) {
    toast(`Cannot open the connection: ${error.message}`);
    scheduleReconnect();
    return;
  }
  state.ws = ws;
  setStatus("connecting");
  let opened = false;
  let ended = false;
  const end = (code, reason) => {
    if (ended || generation !== state.generation) return;
    ended = true;
    onSocketEnd(code, reason, opened);
  };
  ws.onopen = () => {
    if (generation !== state.generation) return;
    opened = true;
    state.attempt = 0;
    setStatus("online");
    // The socket opens only after the server joined the channel: every event from now
    // on arrives, and the history read fills whatever happened before.
    catchUp();
    loadChannels();
  };
  ws.onmessage = (event) => {
    if (generation !== state.generation || typeof event.data !== "string") return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    if (frame && typeof frame === "object") onFrame(frame);
  };
  ws.onclose = (event) => end(event.code, event.reason);
  ws.onerror = () => {
    // A refused upgrade (4xx/5xx) or a network failure; the close event follows with 1006.
  };
}

function onSocketEnd(code, reason, opened) {
  state.ws = null;
  failAllPending("The connection closed before the server confirmed this message; it may or may not have been stored.");
  stopTypingLocal();
  clearTypingPeers();
  if (code === 1008) {
    if (state.auth) {
      signOut("The server ended the session (token expired or not allowed). Paste a new token.");
      return;
    }
    toast(`Disconnected by policy${reason ? `: ${reason}` : ""}.`, "close_1008");
  } else if (code === 1009) {
    toast("That message was too big for the server; it was not sent.", "close_1009");
  } else if (code === 1013) {
    toast("The connection was too slow; reconnecting and catching up.", "close_1013");
  }
  if (!opened && state.auth) {
    // Browsers hide why an upgrade was refused: check whether the token is the cause.
    if (state.me.expiresAt && state.me.expiresAt <= Date.now()) {
      signOut("Your token expired. Paste a new one.");
      return;
    }
    scheduleReconnect();
    probeToken();
    return;
  }
  scheduleReconnect();
}

/** After a refused upgrade in auth mode: a 401 from /api/me means the token is the problem. */
async function probeToken() {
  const token = state.token;
  try {
    const response = await fetch("/api/me", { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
    if (response.status === 401 && state.token === token) {
      signOut("The server refused your token. Paste a new one.");
    }
  } catch {
    // offline: the backoff continues
  }
}

function scheduleReconnect() {
  clearTimeout(state.reconnectTimer);
  // Exponential backoff with full jitter: a random wait in [0, min(cap, base * 2^attempt)).
  const delay = Math.random() * Math.min(RECONNECT_CAP_MS, RECONNECT_BASE_MS * 2 ** state.attempt);
  state.attempt = Math.min(state.attempt + 1, 16);
  setStatus("reconnecting", delay);
  const generation = state.generation;
  state.reconnectTimer = setTimeout(() => {
    state.reconnectTimer = null;
    if (generation === state.generation && state.me) connect();
  }, delay);
}

function reconnectNow() {
  if (state.reconnectTimer !== null && state.me) connect();
}

function sendFrame(frame) {
  const ws = state.ws;
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  try {
    ws.send(JSON.stringify(frame));
    return true;
  } catch {
    return false;
  }
}

// ---------------------------------------------------------------- frames

function onFrame(frame) {
  switch (frame.type) {
    case "message":
      if (frame.channel !== undefined && frame.channel !== state.channel) return;
      confirmPending(frame.client_id);
      renderMessage(frame);
      dropTypingPeer(frame.sender);
      break;
    case "message_deleted":
      removeMessage(frame.message_id);
      break;
    case "user_joined":
      if (typeof frame.username === "string") state.online.add(frame.username);
      renderOnline();
      scheduleOnlineRefresh();
      break;
    case "user_left":
      state.online.delete(frame.username);
      dropTypingPeer(frame.username);
      renderOnline();
      scheduleOnlineRefresh();
      break;
    case "typing_status":
      onTyping(frame);
      break;
    case "error":
      onErrorFrame(frame);
      break;
    default:
      break; // unknown frames are ignored (forward compatibility)
  }
}

function onErrorFrame(frame) {
  const code = typeof frame.code === "string" ? frame.code : "error";
  const detail = typeof frame.detail === "string" ? frame.detail : code;
  if (code === "events_missed") {
    catchUp(); // the replica's feed was interrupted: re-read history and the online list
    return;
  }
  if (code === "token_expired") return; // the 1008 close that follows asks for a new token
  if (typeof frame.client_id === "string" && state.pending.has(frame.client_id)) {
    failPending(frame.client_id, `Not sent: ${detail}`);
    return;
  }
  toast(detail, code);
}

// ---------------------------------------------------------------- messages

function messageKey(message) {
  if (typeof message.message_id === "string" && message.message_id) return message.message_id;
  return `legacy:${message.timestamp}:${message.sender}`;
}

function canDelete(message) {
  return (
    MESSAGE_ID_RE.test(String(message.message_id ?? "")) &&
    (state.me.admin || message.sender === state.me.username)
  );
}

function renderContent(type, content, sender) {
  const value = typeof content === "string" ? content : "";
  if (type === "image" || type === "audio") {
    const ok = type === "image" ? IMAGE_RE.test(value) : AUDIO_RE.test(value);
    if (!ok) return text("p", "[invalid media]", "invalid-media", "message-invalid-media");
    if (type === "image") {
      const img = el("img", "media-image", "message-image");
      img.alt = `image from ${sender}`;
      img.decoding = "async";
      img.addEventListener("load", keepBottom, { once: true });
      img.src = value;
      return img;
    }
    const audio = el("audio", "media-audio", "message-audio");
    audio.controls = true;
    audio.preload = "metadata";
    audio.src = value;
    return audio;
  }
  return text("p", decodeText(value), "text", "message-text");
}

function buildMessage(message, { pending = false } = {}) {
  const sender = String(message.sender ?? "");
  const li = el("li", "message", pending ? "pending-message" : "message");
  if (sender === state.me.username) li.classList.add("mine");
  li.dataset.sender = sender;
  const meta = el("div", "meta");
  meta.append(text("span", sender, "sender", "message-sender"));
  if (message.timestamp) {
    const time = text("time", formatTime(message.timestamp), "time");
    time.dateTime = String(message.timestamp);
    time.title = new Date(message.timestamp).toLocaleString();
    meta.append(time);
  }
  li.append(meta, renderContent(message.message_type, message.content, sender));
  return li;
}

function atBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function keepBottom() {
  if (ui.scroller.dataset.stick === "1") ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

function renderMessage(message) {
  const key = messageKey(message);
  if (state.messages.has(key)) return; // history and live frames overlap: one copy each
  const stick = atBottom() || message.sender === state.me.username;
  const li = buildMessage(message);
  li.dataset.messageId = key;
  li.dataset.timestamp = String(message.timestamp ?? "");
  li.dataset.seq = String(++state.seq);
  if (canDelete(message)) {
    const button = text("button", "Delete", "delete", "message-delete");
    button.type = "button";
    button.setAttribute("aria-label", "Delete this message");
    button.addEventListener("click", () => deleteMessage(key, button));
    li.querySelector(".meta").append(button);
  }
  // Keep the list in timestamp order (history may fill in before live messages).
  let before = null;
  for (let node = ui.messages.lastElementChild; node; node = node.previousElementSibling) {
    if (node.dataset.timestamp <= li.dataset.timestamp) break;
    before = node;
  }
  ui.messages.insertBefore(li, before);
  state.messages.set(key, li);
  if (stick) {
    ui.scroller.dataset.stick = "1";
    ui.scroller.scrollTop = ui.scroller.scrollHeight;
  }
}

function removeMessage(key) {
  const li = state.messages.get(key);
  if (!li) return;
  li.remove();
  state.messages.delete(key);
}

async function deleteMessage(key, button) {
  button.disabled = true;
  try {
    const response = await api(
      `/api/chat/message/${encodeURIComponent(key)}?channel=${encodeURIComponent(state.channel)}`,
      { method: "DELETE" },
    );
    if (response.ok || response.status === 404) {
      removeMessage(key); // 404: already gone
    } else {
      toast(`Cannot delete: ${await errorText(response)}`);
      button.disabled = false;
    }
  } catch (error) {
    if (!(error instanceof TokenRefused)) toast("Cannot delete: the server is unreachable.");
    button.disabled = false;
  }
}

async function loadHistory() {
  const channel = state.channel;
  const seqAtRequest = state.seq;
  let body;
  try {
    const response = await api(`/api/chat/history/${encodeURIComponent(channel)}?limit=${HISTORY_LIMIT}`);
    if (!response.ok) {
      toast(`Cannot load the history: ${await errorText(response)}`);
      return;
    }
    body = await response.json();
  } catch (error) {
    if (!(error instanceof TokenRefused)) toast("Cannot load the history: the server is unreachable.");
    return;
  }
  if (channel !== state.channel) return;
  const messages = Array.isArray(body.messages) ? body.messages.filter((m) => m && typeof m === "object") : [];
  const seen = new Set();
  for (const message of messages) {
    seen.add(messageKey(message));
    renderMessage(message);
  }
  // Messages shown before this read began are stored, so the read returns them unless
  // they were deleted meanwhile (or fell out of a full window).
  const full = messages.length >= HISTORY_LIMIT;
  const oldest = String(messages[0]?.timestamp ?? "");
  for (const [key, li] of [...state.messages]) {
    if (seen.has(key) || Number(li.dataset.seq) > seqAtRequest) continue;
    if (full && li.dataset.timestamp < oldest) continue;
    removeMessage(key);
  }
}

// ---------------------------------------------------------------- sending

function send(content, type) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    toast("Not connected; wait until the status says online.");
    return false;
  }
  const clientId = newClientId();
  if (!sendFrame({ type: "message", content, message_type: type, client_id: clientId })) {
    toast("Not connected; wait until the status says online.");
    return false;
  }
  const li = buildMessage({ sender: state.me.username, content, message_type: type }, { pending: true });
  li.classList.add("pending");
  li.dataset.clientId = clientId;
  li.append(text("p", "sending…", "pending-note", "pending-note"));
  ui.pending.append(li);
  ui.scroller.dataset.stick = "1";
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
  const timer = setTimeout(
    () => failPending(clientId, "No confirmation from the server; it may or may not have been stored."),
    ECHO_TIMEOUT_MS,
  );
  state.pending.set(clientId, { li, timer, content, type });
  // Sending a message turns the server-side typing indicator off.
  state.typingOn = false;
  clearTimeout(state.typingIdleTimer);
  return true;
}

function confirmPending(clientId) {
  const entry = typeof clientId === "string" && state.pending.get(clientId);
  if (!entry) return;
  clearTimeout(entry.timer);
  entry.li.remove();
  state.pending.delete(clientId);
}

function failPending(clientId, reason) {
  const entry = state.pending.get(clientId);
  if (!entry) return;
  clearTimeout(entry.timer);
  state.pending.delete(clientId);
  const { li, content, type } = entry;
  li.classList.remove("pending");
  li.classList.add("failed");
  li.setAttribute("data-testid", "failed-message");
  li.querySelector(".pending-note").textContent = reason;
  const actions = el("div", "actions");
  const retry = text("button", "Retry", "", "message-retry");
  retry.type = "button";
  retry.addEventListener("click", () => {
    if (send(content, type)) li.remove();
  });
  const dismiss = text("button", "Dismiss", "", "message-dismiss");
  dismiss.type = "button";
  dismiss.addEventListener("click", () => li.remove());
  actions.append(retry, dismiss);
  li.append(actions);
}

function failAllPending(reason) {
  for (const clientId of [...state.pending.keys()]) failPending(clientId, reason);
}

function onComposerSubmit(event) {
  event.preventDefault();
  const value = ui.messageInput.value;
  if (!value.trim()) return;
  if (utf8Bytes(value) > MAX_TEXT_BYTES) {
    toast(`Messages are at most ${MAX_TEXT_BYTES} bytes.`);
    return;
  }
  if (send(value, "text")) ui.messageInput.value = "";
}

async function onImageChosen() {
  const file = ui.imageInput.files?.[0];
  ui.imageInput.value = ""; // the same file can be chosen again
  if (!file) return;
  if (!IMAGE_TYPES.includes(file.type)) {
    toast("Images must be PNG, JPEG, GIF or WebP.");
    return;
  }
  const estimate = `data:${file.type};base64,`.length + 4 * Math.ceil(file.size / 3);
  if (estimate > MAX_MEDIA_BYTES) {
    toast(`That image is too large (at most about ${Math.floor((MAX_MEDIA_BYTES * 3) / 4 / 1024)} KB).`);
    return;
  }
  let url;
  try {
    url = await readAsDataUrl(file);
  } catch {
    toast("Cannot read that file.");
    return;
  }
  if (!IMAGE_RE.test(url) || url.length > MAX_MEDIA_BYTES) {
    toast("That image cannot be sent.");
    return;
  }
  send(url, "image");
}

async function onRecordClick() {
  if (state.recorder) {
    stopRecording(false);
    return;
  }
  if (!navigator.mediaDevices?.getUserMedia || typeof MediaRecorder === "undefined") {
    toast("Recording needs a secure (https) page and a browser with MediaRecorder.");
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch {
    toast("No microphone, or permission was refused.");
    return;
  }
  const mimeType = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus", "audio/mp4"].find((t) =>
    MediaRecorder.isTypeSupported(t),
  );
  let recorder;
  try {
    recorder = new MediaRecorder(stream, { ...(mimeType ? { mimeType } : {}), audioBitsPerSecond: 32000 });
  } catch {
    stream.getTracks().forEach((t) => t.stop());
    toast("This browser cannot record audio.");
    return;
  }
  const chunks = [];
  const entry = { recorder, stream, discard: false, timer: null };
  recorder.ondataavailable = (event) => {
    if (event.data.size === 0) return;
    chunks.push(event.data);
    // Audio has been captured: the button says so (and tests wait for it).
    if (state.recorder === entry) ui.record.dataset.recorded = "true";
  };
  recorder.onstop = async () => {
    stream.getTracks().forEach((t) => t.stop());
    if (entry.discard) return;
    if (chunks.length === 0) {
      toast("Nothing was recorded: hold the recording a little longer.");
      return;
    }
    // A bare media type (no ";codecs=") so that the data URL matches the strict pattern.
    const type = (recorder.mimeType || mimeType || "audio/webm").split(";")[0].trim();
    const url = await readAsDataUrl(new Blob(chunks, { type }));
    if (!AUDIO_RE.test(url)) toast("This recording format cannot be sent.");
    else if (url.length > MAX_MEDIA_BYTES) toast("That recording is too long.");
    else send(url, "audio");
  };
  state.recorder = entry;
  entry.timer = setTimeout(() => stopRecording(false), MAX_RECORDING_MS);
  // Data every 250 ms, so a recording is known to hold audio before it is stopped.
  recorder.start(RECORDING_SLICE_MS);
  ui.record.setAttribute("aria-pressed", "true");
  ui.record.classList.add("recording");
  ui.record.title = "Stop and send";
}

function stopRecording(discard) {
  const entry = state.recorder;
  if (!entry) return;
  state.recorder = null;
  clearTimeout(entry.timer);
  entry.discard = discard;
  if (entry.recorder.state !== "inactive") entry.recorder.stop();
  delete ui.record.dataset.recorded;
  ui.record.setAttribute("aria-pressed", "false");
  ui.record.classList.remove("recording");
  ui.record.title = "Record a short voice message";
}

// ---------------------------------------------------------------- typing

function onInput() {
  if (!ui.messageInput.value) {
    stopTypingLocal(true);
    return;
  }
  const now = Date.now();
  if (!state.typingOn || now - state.typingSentAt > TYPING_REFRESH_MS) {
    if (sendFrame({ type: "typing_start" })) {
      state.typingOn = true;
      state.typingSentAt = now;
    }
  }
  clearTimeout(state.typingIdleTimer);
  state.typingIdleTimer = setTimeout(() => stopTypingLocal(true), TYPING_IDLE_MS);
}

function stopTypingLocal(notify = false) {
  clearTimeout(state.typingIdleTimer);
  if (state.typingOn && notify) sendFrame({ type: "typing_stop" });
  state.typingOn = false;
}

function onTyping(frame) {
  const name = frame.username;
  if (typeof name !== "string" || name === state.me.username) return;
  if (frame.channel !== undefined && frame.channel !== state.channel) return;
  clearTimeout(state.typingPeers.get(name));
  if (frame.is_typing === true) {
    state.typingPeers.set(
      name,
      setTimeout(() => dropTypingPeer(name), TYPING_SHOW_MS),
    );
  } else {
    state.typingPeers.delete(name);
  }
  renderTyping();
}

function dropTypingPeer(name) {
  if (!state.typingPeers.has(name)) return;
  clearTimeout(state.typingPeers.get(name));
  state.typingPeers.delete(name);
  renderTyping();
}

function clearTypingPeers() {
  for (const timer of state.typingPeers.values()) clearTimeout(timer);
  state.typingPeers.clear();
  renderTyping();
}

function renderTyping() {
  const names = [...state.typingPeers.keys()].sort();
  let line = "";
  if (names.length === 1) line = `${names[0]} is typing…`;
  else if (names.length === 2) line = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) line = `${names.length} people are typing…`;
  ui.typing.textContent = line;
  ui.typing.dataset.active = names.length ? "1" : "0";
  ui.typing.dataset.users = names.join(" ");
}

// ---------------------------------------------------------------- online list and channels

function scheduleOnlineRefresh() {
  clearTimeout(state.onlineTimer);
  state.onlineTimer = setTimeout(loadOnline, ONLINE_REFRESH_DELAY_MS);
}

async function loadOnline() {
  const channel = state.channel;
  try {
    const response = await api(`/api/users/online/${encodeURIComponent(channel)}`);
    if (!response.ok) {
      toast(`Cannot load who is online: ${await errorText(response)}`);
      return;
    }
    const body = await response.json();
    if (channel !== state.channel) return;
    const users = Array.isArray(body.online_users) ? body.online_users : [];
    state.online = new Set(users.map((u) => u && u.username).filter((n) => typeof n === "string"));
    renderOnline();
  } catch (error) {
    if (!(error instanceof TokenRefused)) toast("Cannot load who is online: the server is unreachable.");
  }
}

function renderOnline() {
  const names = [...state.online].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  const items = names.map((name) => {
    const li = text("li", name, name === state.me.username ? "me" : "", "online-user");
    li.dataset.username = name;
    return li;
  });
  ui.onlineList.replaceChildren(...items);
  ui.onlineCount.textContent = String(names.length);
}

async function loadChannels() {
  try {
    const response = await api("/api/chat/channels");
    if (!response.ok) return;
    const body = await response.json();
    const names = Array.isArray(body.channels)
      ? body.channels.filter((c) => validName(c, CHANNEL_MAX) && mayJoin(state.me, c))
      : [];
    renderChannels(names);
  } catch {
    // the list is a convenience; free entry still works
  }
}

function renderChannels(names) {
  const all = [...new Set([...names, state.channel])].sort();
  const items = all.map((name) => {
    const li = el("li");
    const button = text("button", `# ${name}`, "channel", "channel-item");
    button.type = "button";
    button.dataset.channel = name;
    if (name === state.channel) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => switchChannel(name));
    li.append(button);
    return li;
  });
  ui.channelList.replaceChildren(...items);
}

function resetChannelView() {
  failAllPending("Not confirmed before leaving the channel.");
  ui.pending.replaceChildren();
  ui.messages.replaceChildren();
  state.messages.clear();
  state.online.clear();
  renderOnline();
  clearTypingPeers();
  ui.channelTitle.textContent = state.channel;
  document.title = `#${state.channel} · chatgate`;
  renderChannels([...ui.channelList.querySelectorAll("button[data-channel]")].map((b) => b.dataset.channel));
}

function switchChannel(name) {
  if (!validName(name, CHANNEL_MAX)) {
    toast("Channel names are 1 to 64 letters, digits, _, - or .");
    return;
  }
  closeSidebar();
  if (name === state.channel) return;
  if (!mayJoin(state.me, name)) {
    toast(`Your token does not allow the channel ${name}.`);
    return;
  }
  state.channel = name;
  localStorage.setItem(CHANNEL_KEY, name);
  state.attempt = 0;
  resetChannelView();
  connect();
}

function catchUp() {
  loadHistory();
  loadOnline();
}

// ---------------------------------------------------------------- layout

function openSidebar() {
  ui.sidebar.classList.add("open");
  ui.scrim.hidden = false;
  ui.menuToggle.setAttribute("aria-expanded", "true");
}

function closeSidebar() {
  ui.sidebar.classList.remove("open");
  ui.scrim.hidden = true;
  ui.menuToggle.setAttribute("aria-expanded", "false");
}

// ---------------------------------------------------------------- start

function bind() {
  ui.loginForm.addEventListener("submit", onLoginSubmit);
  ui.renew.addEventListener("submit", onRenewSubmit);
  ui.logout.addEventListener("click", () => signOut());
  ui.composer.addEventListener("submit", onComposerSubmit);
  ui.messageInput.addEventListener("input", onInput);
  ui.messageInput.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.imageInput.addEventListener("change", onImageChosen);
  ui.record.addEventListener("click", onRecordClick);
  ui.channelForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const name = ui.channelInput.value.trim();
    if (!name) return;
    ui.channelInput.value = "";
    switchChannel(name);
  });
  ui.menuToggle.addEventListener("click", () =>
    ui.sidebar.classList.contains("open") ? closeSidebar() : openSidebar(),
  );
  ui.scrim.addEventListener("click", closeSidebar);
  ui.scroller.addEventListener("scroll", () => {
    ui.scroller.dataset.stick = atBottom() ? "1" : "0";
  });
  window.addEventListener("online", reconnectNow);
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") reconnectNow();
  });
}

async function start() {
  bind();
  try {
    const response = await fetch("/app/config.json", { cache: "no-store" });
    state.auth = (await response.json()).auth === true;
  } catch {
    state.auth = true; // the safe guess; the login form says what failed
    showLogin("Cannot reach the server; reload to try again.");
    return;
  }
  const stored = localStorage.getItem(CHANNEL_KEY);
  if (validName(stored, CHANNEL_MAX)) state.channel = stored;
  if (state.auth) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) {
      try {
        const identity = await identify(token);
        const usable = mayJoin(identity.me, state.channel) ? state.channel : identity.me.channels[0];
        if (usable) {
          enterChat({ ...identity, channel: usable });
          return;
        }
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin("This token allows no channel.");
        return;
      } catch (error) {
        sessionStorage.removeItem(TOKEN_KEY);
        showLogin(error.message);
        return;
      }
    }
  } else {
    const username = localStorage.getItem(USERNAME_KEY);
    if (validName(username, USERNAME_MAX)) ui.loginUsername.value = username;
  }
  showLogin();
}

start().finally(() => {
  document.documentElement.dataset.ready = "1";
});
