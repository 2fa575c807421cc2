// @ts-check
/**
 * client.js: a small, dependency-free WebSocket client for the Unipile realtime relay.
 *
 * Connects to fanout's `GET /ws/messages`, keeps the last sequence number seen, and on
 * any drop reconnects with exponential backoff (jittered: a random delay between half and all of
 * min(30 s, base * 2^attempt)) resuming
 * with `?since=<last seq>`, so no event is lost or repeated. When the server says the
 * history no longer reaches back that far (`hello.recovered === false`, or close code
 * 4001), it emits `reload` so the app refetches by REST.
 *
 * ```js
 * import { RelayClient } from "https://relay.example.com/client.js";
 * const relay = new RelayClient({ url: "wss://relay.example.com/ws/messages", token });
 * relay.on("message:new", (e) => render(e.data.message));
 * relay.on("status", (s) => badge(s.state));
 * relay.on("reload", () => refetchInbox());
 * relay.connect();
 * ```
 *
 * With the `api` option (ingest's REST base URL) it also sends replies through the relay:
 * `await relay.send(chatId, "On my way")` (see {@link RelayClient#send}).
 *
 * Presence between agents of the same accounts: `relay.viewing(chatId)` when a chat is
 * opened (`viewing(null)` when closed), `relay.typing(chatId)` on every keystroke (sent
 * at most every `typingEveryMs`), and `relay.on("presence", ({chat_id, viewers, typing}) => ...)`
 * for who else has the chat open and who is typing (never this agent itself). The chat's
 * account comes from the events seen, or from `relay.rememberChat(chatId, accountId)`.
 *
 * @module client
 */

/**
 * @typedef {object} Hello
 * @property {"hello"} type
 * @property {string} connection_id
 * @property {number} seq             latest sequence number of the stream
 * @property {number} heartbeat_s     seconds between server pings
 * @property {boolean} [recovered]    present on a resume: true = no gap, false = reload by REST
 */

/**
 * The event envelope, identical on NATS and on the socket.
 * @typedef {object} RelayEvent
 * @property {"message:new"|"message:read"|"message:reaction"|"message:edited"|"message:deleted"|"message:status"|"chat:read"|"account:status"} type
 * @property {string} id              unique per event
 * @property {number} seq             stream sequence, strictly increasing on a connection
 * @property {string} account_id
 * @property {string|null} chat_id
 * @property {string} occurred_at     RFC 3339
 * @property {boolean} [truncated]    true when data was cut to fit on NATS: read the message by REST
 * @property {any} data               per type; see DESIGN.md
 */

/**
 * @typedef {object} Status
 * @property {"connecting"|"open"|"reconnecting"|"closed"} state
 * @property {number} attempt         consecutive failed attempts (0 when open)
 * @property {number} [delay_ms]      wait before the next attempt (reconnecting only)
 * @property {number} [code]          close code of the socket that just ended
 * @property {string} [reason]
 */

/**
 * Payloads by event name: the lifecycle events plus every envelope type.
 * `event` fires for every envelope whatever its type; `reload` means the history was
 * lost (refetch by REST); `status` follows the connection.
 * @typedef {{
 *   "hello": Hello,
 *   "event": RelayEvent,
 *   "message:new": RelayEvent,
 *   "message:read": RelayEvent,
 *   "message:reaction": RelayEvent,
 *   "message:edited": RelayEvent,
 *   "message:deleted": RelayEvent,
 *   "message:status": RelayEvent,
 *   "chat:read": RelayEvent,
 *   "account:status": RelayEvent,
 *   "status": Status,
 *   "presence": PresenceState,
 *   "presence:typing": any,
 *   "presence:viewing": any,
 *   "presence:viewers": any,
 *   "reload": {reason: string},
 *   "error": {code?: string, message: string},
 * }} RelayEvents
 */

/**
 * Who else is on a chat, rebuilt on every presence frame (and when a typing expires).
 * @typedef {object} PresenceState
 * @property {string} account_id
 * @property {string} chat_id
 * @property {{sub: string, name?: string}[]} viewers   other agents with the chat open
 * @property {{sub: string, name?: string}[]} typing    other agents typing in it now
 */

/**
 * @typedef {object} RelayClientOptions
 * @property {string} url                     ws(s)://host/ws/messages
 * @property {string | (() => string | Promise<string>)} token  a JWT, or a function returning a fresh one
 * @property {number} [since]                 resume after this sequence on the first connect
 * @property {string[]} [chatIds]             narrow the connection to these chats (re-sent on every reconnect)
 * @property {number} [baseDelayMs=500]       first backoff step
 * @property {number} [maxDelayMs=30000]      backoff cap
 * @property {number} [openTimeoutMs=2000]    an upgrade not answered within this is given up and tried
 *   again (a hung replica: its TCP accepts, nothing answers; through a round-robin gateway the
 *   next try reaches another replica)
 * @property {typeof WebSocket} [WebSocketImpl]
 * @property {string} [api]                   ingest's REST base URL (e.g. https://relay.example.com), for {@link RelayClient#send}
 * @property {number} [typingEveryMs=2000]    at most one `typing` frame per chat this often (others see it
 *   for FANOUT_TYPING_EXPIRY_MS, 5 s, after the last)
 */

/**
 * A reply that did not go through: `status` is the HTTP status (0: the API could not be
 * reached, network or CORS), `code` the error code (`unipile_rate_limited`, `rate_limited` (the relay's own per-token limit), `unipile_error`,
 * `unipile_timeout`, `unprocessable`, ...), `retryAfter` seconds when the API said, and
 * `reply` the stored reply (`state: "failed"`) when there is one.
 */
export class RelaySendError extends Error {
  /**
   * @param {string} message
   * @param {{status: number, code: string, retryAfter?: number | null, reply?: any}} details
   */
  constructor(message, { status, code, retryAfter = null, reply = null }) {
    super(message);
    this.name = "RelaySendError";
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
    this.reply = reply;
  }
}

/** A random idempotency key. */
function newClientId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  const bytes = globalThis.crypto.getRandomValues(new Uint8Array(16));
  return [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

const TERMINAL_CODES = new Set([4002]); // token expired: reconnect only with a new token
/** How many recent event ids a client remembers to drop an event the stream holds twice. */
const REMEMBERED_IDS = 1000;

export class RelayClient {
  /** @param {RelayClientOptions} options */
  constructor(options) {
    this.options = { baseDelayMs: 500, maxDelayMs: 30000, openTimeoutMs: 2000, ...options };
    /** @type {number | null} last sequence number delivered to handlers */
    this.lastSeq = options.since ?? null;
    /** @type {WebSocket | null} */
    this.socket = null;
    /** @type {Hello | null} */
    this.hello = null;
    this.attempt = 0;
    this.stopped = true;
    /** @type {Map<string, Set<Function>>} */
    this.handlers = new Map();
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    this.retryTimer = undefined;
    /** @type {ReturnType<typeof setInterval> | undefined} */
    this.pingTimer = undefined;
    this.lastFrameAt = 0;
    /**
     * Ids of the latest events delivered, oldest first. The stream can hold one event
     * twice, under two seqs: ingest republishes it if it crashed after JetStream's ack
     * and came back after JetStream's duplicate window. Its `id` is still the same.
     * @type {Set<string>}
     */
    this.recentIds = new Set();
    /** @type {Map<string, string>} account of each chat seen, for presence frames */
    this.chatAccounts = new Map();
    /** @type {{chatId: string, accountId: string} | null} the chat this agent has open */
    this.viewingChat = null;
    /** @type {Map<string, number>} when `typing` was last sent, per chat */
    this.typingSentAt = new Map();
    /**
     * Presence per chat: viewers and typists by `sub`, typists with their expiry timer.
     * @type {Map<string, {account_id: string, viewers: Map<string, any>, typing: Map<string, {who: any, timer: any}>}>}
     */
    this.presence = new Map();
  }

  /**
   * Tells the client which account a chat belongs to (the REST chat list says), for
   * {@link typing} and {@link viewing} on chats no event has named yet.
   * @param {string} chatId
   * @param {string} accountId
   */
  rememberChat(chatId, accountId) {
    if (chatId && accountId) this.chatAccounts.set(chatId, accountId);
  }

  /**
   * Says this agent is typing in a chat; call it on every keystroke, it is sent at
   * most every `typingEveryMs`. Others see it for a few seconds after the last one.
   * @param {string} chatId
   * @param {string} [accountId]   defaults to the account the chat was seen with
   * @returns {boolean} false when the chat's account is unknown
   */
  typing(chatId, accountId = this.chatAccounts.get(chatId)) {
    if (!accountId) return false;
    const now = Date.now();
    if (now - (this.typingSentAt.get(chatId) ?? 0) < (this.options.typingEveryMs ?? 2000)) return true;
    this.typingSentAt.set(chatId, now);
    if (this.typingSentAt.size > 16) this.typingSentAt.delete(this.typingSentAt.keys().next().value);
    this.sendFrame({ type: "typing", account_id: accountId, chat_id: chatId });
    return true;
  }

  /**
   * Says which chat this agent has open (`null`: none). Kept for reconnects; the
   * server answers with the chat's current viewers (a `presence` event).
   * @param {string | null} chatId
   * @param {string} [accountId]   defaults to the account the chat was seen with
   * @returns {boolean} false when the chat's account is unknown
   */
  viewing(chatId, accountId = chatId ? this.chatAccounts.get(chatId) : undefined) {
    if (chatId == null) {
      this.viewingChat = null;
      this.sendFrame({ type: "viewing", chat_id: null });
      return true;
    }
    if (!accountId) return false;
    this.viewingChat = { chatId, accountId };
    this.sendFrame({ type: "viewing", account_id: accountId, chat_id: chatId });
    return true;
  }

  /**
   * Who else is on a chat now.
   * @param {string} chatId
   * @returns {PresenceState}
   */
  presenceOf(chatId) {
    const chat = this.presence.get(chatId);
    return {
      account_id: chat?.account_id ?? this.chatAccounts.get(chatId) ?? "",
      chat_id: chatId,
      viewers: [...(chat?.viewers.values() ?? [])],
      typing: [...(chat?.typing.values() ?? [])].map((t) => t.who),
    };
  }

  /** @param {string} chatId @param {string} accountId */
  presenceEntry(chatId, accountId) {
    let chat = this.presence.get(chatId);
    if (!chat) this.presence.set(chatId, (chat = { account_id: accountId, viewers: new Map(), typing: new Map() }));
    return chat;
  }

  /** @param {any} frame  a `presence:*` frame (no seq: not an event) */
  receivePresence(frame) {
    const { chat_id: chatId, account_id: accountId } = frame;
    if (typeof chatId !== "string") return;
    this.rememberChat(chatId, accountId);
    const chat = this.presenceEntry(chatId, accountId);
    const who = (/** @type {any} */ f) => (f.name ? { sub: f.sub, name: f.name } : { sub: f.sub });
    if (frame.type === "presence:viewers") {
      chat.viewers = new Map((frame.viewers ?? []).map((v) => [v.sub, who(v)]));
    } else if (frame.type === "presence:viewing") {
      if (frame.viewing) chat.viewers.set(frame.sub, who(frame));
      else chat.viewers.delete(frame.sub);
    } else if (frame.type === "presence:typing") {
      clearTimeout(chat.typing.get(frame.sub)?.timer);
      const timer = setTimeout(() => {
        chat.typing.delete(frame.sub);
        this.emit("presence", this.presenceOf(chatId));
      }, Math.max(0, Number(frame.expires_in_ms) || 5000));
      chat.typing.set(frame.sub, { who: who(frame), timer });
    } else {
      return;
    }
    this.emit(frame.type, frame);
    this.emit("presence", this.presenceOf(chatId));
  }

  /** Forgets every presence: the socket that told it is gone (the next one re-tells). */
  clearPresence() {
    for (const [chatId, chat] of this.presence) {
      for (const t of chat.typing.values()) clearTimeout(t.timer);
      this.presence.delete(chatId);
      this.emit("presence", this.presenceOf(chatId));
    }
  }

  /**
   * Registers a handler; returns a function that removes it.
   * @template {keyof RelayEvents} K
   * @param {K} name
   * @param {(payload: RelayEvents[K]) => void} handler
   * @returns {() => void}
   */
  on(name, handler) {
    let set = this.handlers.get(name);
    if (!set) this.handlers.set(name, (set = new Set()));
    set.add(handler);
    return () => set.delete(handler);
  }

  /**
   * @template {keyof RelayEvents} K
   * @param {K} name
   * @param {RelayEvents[K]} payload
   */
  emit(name, payload) {
    for (const handler of this.handlers.get(name) ?? []) {
      try {
        handler(payload);
      } catch (error) {
        console.error(`relay: ${name} handler failed`, error);
      }
    }
  }

  /** Opens the connection (and keeps it open until {@link close}). */
  connect() {
    this.stopped = false;
    clearTimeout(this.retryTimer);
    void this.open();
  }

  /** Closes for good: no reconnect. */
  close() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    clearInterval(this.pingTimer);
    this.socket?.close(1000, "client closed");
    this.socket = null;
    this.emit("status", { state: "closed", attempt: 0 });
  }

  /**
   * Narrows the connection to some chats (empty: all the token may see). Kept for reconnects.
   * @param {string[]} chatIds
   */
  subscribe(chatIds) {
    this.options.chatIds = chatIds;
    this.sendFrame({ type: "subscribe", chat_ids: chatIds });
  }

  /**
   * Sends a reply in a chat through the relay (ingest's `POST /api/chats/{chatId}/messages`,
   * which sends it through Unipile). Every tab, this one included, sees it at once as a
   * `message:new` with `state: "pending"`, then a `message:status` (`sent` or `failed`).
   *
   * Resolves with the stored reply (`state: "sent"`). Rejects with a {@link RelaySendError}
   * whose `reply` is the failed reply when Unipile refused, failed or timed out; nothing is
   * retried for you. Repeating a call with the same `clientId` (after a network error, say)
   * sends nothing new and gets the first answer; a deliberate new attempt takes a new one.
   *
   * (Called with a single object, `send(frame)` writes a raw frame on the socket, as before.)
   *
   * @param {string | object} chatId
   * @param {string} [text]
   * @param {{clientId?: string, files?: Blob[], signal?: AbortSignal}} [options]  `files` go as
   *   `multipart/form-data` (at most 10, within the API's REPLY_MAX_BODY_BYTES)
   * @returns {Promise<any>}
   */
  send(chatId, text, options = {}) {
    if (typeof chatId === "object" && chatId !== null) {
      this.sendFrame(chatId);
      return Promise.resolve(null);
    }
    return this.sendReply(chatId, String(text ?? ""), options);
  }

  /**
   * @param {string} chatId
   * @param {string} text
   * @param {{clientId?: string, files?: Blob[], signal?: AbortSignal}} options
   */
  async sendReply(chatId, text, { clientId = newClientId(), files = [], signal } = {}) {
    const base = (this.options.api ?? globalThis.location?.origin ?? "").replace(/\/$/, "");
    const { token } = this.options;
    const jwt = typeof token === "function" ? await token() : token;
    /** @type {Record<string, string>} */
    const headers = { Authorization: `Bearer ${jwt}` };
    /** @type {BodyInit} */
    let body;
    if (files.length) {
      const form = new FormData();
      form.append("text", text);
      form.append("client_id", clientId);
      // @ts-ignore a File has a name; a plain Blob gets one from the API
      for (const file of files) form.append("attachments", file, file.name ?? "attachment");
      body = form;
    } else {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify({ text, client_id: clientId });
    }
    let response;
    try {
      response = await fetch(`${base}/api/chats/${encodeURIComponent(chatId)}/messages`, {
        method: "POST",
        headers,
        body,
        signal,
      });
    } catch (error) {
      throw new RelaySendError(`cannot reach the API at ${base}: network error or CORS refusal (${error})`, {
        status: 0,
        code: "network",
      });
    }
    /** @type {any} */
    const answer = await response.json().catch(() => null);
    if (response.ok) return answer;
    const retryAfter = Number(response.headers.get("retry-after")) || null;
    throw new RelaySendError(answer?.error?.message ?? `HTTP ${response.status}`, {
      status: response.status,
      code: answer?.error?.code ?? "http_error",
      retryAfter,
      reply: answer?.message ?? null,
    });
  }

  /** @param {object} frame */
  sendFrame(frame) {
    if (this.socket?.readyState === 1) this.socket.send(JSON.stringify(frame));
  }

  async open() {
    const { url, token } = this.options;
    this.emit("status", { state: this.attempt ? "reconnecting" : "connecting", attempt: this.attempt });
    let jwt;
    try {
      jwt = typeof token === "function" ? await token() : token;
    } catch (error) {
      this.emit("error", { message: `token provider failed: ${error}` });
      return this.retry();
    }
    if (this.stopped) return;
    const target = new URL(url, globalThis.location?.href);
    if (this.lastSeq != null) target.searchParams.set("since", String(this.lastSeq));
    const Impl = this.options.WebSocketImpl ?? WebSocket;
    // The token rides in a subprotocol, never in the URL, which proxies log; the server
    // selects "relay.v1".
    const socket = new Impl(target.toString(), ["relay.v1", `bearer.${jwt}`]);
    this.socket = socket;
    const openTimer = setTimeout(() => {
      if (this.socket !== socket || socket.readyState !== 0) return;
      this.emit("error", { code: "open_timeout", message: `no answer to the upgrade in ${this.options.openTimeoutMs} ms` });
      socket.onclose?.({ code: 1006, reason: "open timeout" });
      socket.close();
    }, this.options.openTimeoutMs);
    socket.onopen = () => clearTimeout(openTimer);
    socket.onmessage = (message) => this.receive(socket, message.data);
    socket.onclose = (close) => {
      clearTimeout(openTimer);
      if (this.socket !== socket) return;
      clearInterval(this.pingTimer);
      this.socket = null;
      this.clearPresence();
      if (this.stopped) return;
      if (close.code === 4001) {
        // The stream was reset: start over without since, after a REST reload.
        this.lastSeq = null;
        this.emit("reload", { reason: close.reason || "stream reset" });
      }
      if (TERMINAL_CODES.has(close.code) && typeof token !== "function") {
        this.stopped = true;
        this.emit("error", { code: "token_expired", message: close.reason || "token expired" });
        this.emit("status", { state: "closed", attempt: this.attempt, code: close.code, reason: close.reason });
        return;
      }
      this.retry(close.code, close.reason);
    };
  }

  /**
   * @param {WebSocket} socket
   * @param {string} data
   */
  receive(socket, data) {
    if (this.socket !== socket) return;
    this.lastFrameAt = Date.now();
    /** @type {any} */
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    switch (frame.type) {
      case "hello":
        this.hello = frame;
        this.attempt = 0;
        if (frame.recovered === false) {
          this.emit("reload", { reason: "history no longer reaches back to the last event seen" });
        }
        if (this.lastSeq == null || frame.recovered === false) this.lastSeq = frame.seq;
        if (this.options.chatIds?.length) this.sendFrame({ type: "subscribe", chat_ids: this.options.chatIds });
        // The server forgot what the last socket viewed: say it again.
        if (this.viewingChat) {
          const { chatId, accountId } = this.viewingChat;
          this.sendFrame({ type: "viewing", account_id: accountId, chat_id: chatId });
        }
        this.keepAlive(socket, frame.heartbeat_s);
        this.emit("hello", frame);
        this.emit("status", { state: "open", attempt: 0 });
        return;
      case "pong":
      case "subscribed":
        return;
      case "error":
        this.emit("error", frame);
        return;
      case "presence:typing":
      case "presence:viewing":
      case "presence:viewers":
        this.receivePresence(frame);
        return;
      default:
        if (typeof frame.seq !== "number") return;
        if (this.lastSeq != null && frame.seq <= this.lastSeq) return; // already seen
        this.lastSeq = frame.seq;
        if (typeof frame.id === "string") {
          if (this.recentIds.has(frame.id)) return; // the same event under a second seq
          this.recentIds.add(frame.id);
          if (this.recentIds.size > REMEMBERED_IDS) this.recentIds.delete(this.recentIds.values().next().value);
        }
        if (typeof frame.chat_id === "string") this.rememberChat(frame.chat_id, frame.account_id);
        this.emit("event", frame);
        this.emit(frame.type, frame);
    }
  }

  /**
   * Pings at the server's heartbeat; a socket silent for two heartbeats is dropped.
   * @param {WebSocket} socket
   * @param {number} heartbeatS
   */
  keepAlive(socket, heartbeatS) {
    clearInterval(this.pingTimer);
    const every = Math.max(1, heartbeatS || 30) * 1000;
    this.pingTimer = setInterval(() => {
      if (Date.now() - this.lastFrameAt > 2 * every + 1000) {
        socket.close(4100, "heartbeat missed");
        return;
      }
      this.sendFrame({ type: "ping" });
    }, every);
  }

  /**
   * Schedules the next attempt: base * 2^attempt, capped, jittered between half and all of it.
   * @param {number} [code]
   * @param {string} [reason]
   */
  retry(code, reason) {
    const { baseDelayMs, maxDelayMs } = this.options;
    const ceiling = Math.min(maxDelayMs ?? 30000, (baseDelayMs ?? 500) * 2 ** this.attempt);
    const delay = Math.round(ceiling / 2 + (Math.random() * ceiling) / 2);
    this.attempt += 1;
    this.emit("status", { state: "reconnecting", attempt: this.attempt, delay_ms: delay, code, reason });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => void this.open(), delay);
  }
}
