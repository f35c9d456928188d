// Apollo rollout console: a thin client of the JSON API and its event stream.
'use strict';

const token = new URLSearchParams(location.search).get('token');
const $ = (sel) => document.querySelector(sel);
let current = null;       // selected session id
let source = null;        // EventSource of the selected session

async function api(method, path, body) {
  const headers = {};
  if (token) headers['Authorization'] = 'Bearer ' + token;
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const reply = await fetch(path, init);
  const data = await reply.json().catch(() => ({}));
  if (!reply.ok) throw new Error(data.error || ('HTTP ' + reply.status));
  return data;
}

function say(text) { $('#message').textContent = text; }

async function refreshSessions() {
  try {
    const { sessions } = await api('GET', '/api/sessions');
    const list = $('#sessions');
    list.replaceChildren(...sessions.map((s) => {
      const li = document.createElement('li');
      li.className = 'session-item' + (s.session_id === current ? ' active' : '');
      li.dataset.id = s.session_id;
      li.textContent = `${s.session_id} · ${s.status} · ${s.num_steps} steps`;
      li.onclick = () => select(s.session_id);
      return li;
    }));
    $('#conn').textContent = 'connected';
  } catch (e) {
    $('#conn').textContent = 'disconnected: ' + e.message;
  }
}

let shownUpdatedAt = 0;  // the newest session snapshot rendered so far

function showSession(s) {
  // A GET answered late must not overwrite a newer snapshot from the event stream.
  if (s.updated_at < shownUpdatedAt) return;
  shownUpdatedAt = s.updated_at;
  $('#session-title').textContent = `${s.session_id} (${s.env_name}, seed ${s.seed}, ${s.backend})`;
  const status = $('#status');
  status.textContent = s.status + (s.paused && s.status !== 'paused' ? ' (pausing…)' : '');
  status.className = 'badge ' + s.status;
  $('#result').textContent = s.result ? JSON.stringify(s.result) : '';
  const items = (s.guidance || []).map((g) => {
    const li = document.createElement('li');
    const when = g.delivered_step === null ? 'waiting for the next turn' : `delivered at step ${g.delivered_step}`;
    li.textContent = `[${g.source}] ${g.text} — ${when}`;
    li.className = g.delivered_step === null ? 'pending' : 'delivered';
    return li;
  });
  $('#guidance-list').replaceChildren(...items);
}

// ------------------------------------------------------------------ DOM helpers
// Everything the server sends (model replies, observations, guidance) may hold
// HTML: it only ever enters the page as text nodes (textContent), never as markup.

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('data-')) node.dataset[key.slice(5)] = value;
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

const SVG_NS = 'http://www.w3.org/2000/svg';
// Icons drawn inline (emoji glyphs are missing from many fonts): a check and a cross.
const ICONS = { good: 'M3 8.5l3.2 3.2L13 4.8', bad: 'M4 4l8 8M12 4l-8 8' };

function icon(name) {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('viewBox', '0 0 16 16');
  svg.setAttribute('width', '12');
  svg.setAttribute('height', '12');
  svg.setAttribute('aria-hidden', 'true');
  const path = document.createElementNS(SVG_NS, 'path');
  path.setAttribute('d', ICONS[name]);
  path.setAttribute('fill', 'none');
  path.setAttribute('stroke', 'currentColor');
  path.setAttribute('stroke-width', '2.2');
  path.setAttribute('stroke-linecap', 'round');
  path.setAttribute('stroke-linejoin', 'round');
  svg.append(path);
  return svg;
}

const pretty = (value) => JSON.stringify(value, null, 2);
const preview = (text, n) => (text.length > n ? text.slice(0, n) + '…' : text);

// ------------------------------------------------------------------ steps

const shownSteps = new Map();  // step_index -> latest light step JSON of the session

function assistantOf(step) {
  return step.assistant || { role: 'assistant', content: step.response };
}

function actionText(step) {
  if (step.kind === 'summary') return 'context summary';
  if (step.action) return `${step.action.tool} ${JSON.stringify(step.action.arguments)}`;
  return 'no call executed';
}

// Badges saying what went wrong with a step's call: [css class, label, tooltip].
function stepBadges(step) {
  if (step.kind !== 'action') return [];
  const call = step.call || {};
  const info = step.info || {};
  const out = [];
  if (!step.action) {
    let label = 'parse failed';
    if (call.no_call) label = 'no tool call';
    else if (call.multiple) label = `${call.calls} tool calls`;
    else if (call.malformed) label = 'malformed call';
    out.push(['parse-error', label, step.parse_error || 'the reply did not parse']);
  } else if (call.unknown_tool) {
    out.push(['call-error', 'unknown tool', step.observation]);
  } else if (step.call && !call.schema_ok) {
    out.push(['call-error', 'bad arguments', step.observation]);
  } else if (info.invalid_action) {
    out.push(['call-error', 'invalid action', step.observation]);
  }
  if (info.tool_exception) out.push(['call-error', 'tool error', step.observation]);
  if (step.done) out.push(['done', 'done', 'the episode ended at this step']);
  return out;
}

function callCheckText(step) {
  const call = step.call;
  if (!call) return '';
  const facts = [`${call.mode} mode`, `${call.calls} call${call.calls === 1 ? '' : 's'} found`];
  for (const key of ['parsed', 'schema_ok', 'unknown_tool', 'malformed', 'no_call', 'multiple']) {
    if (call[key]) facts.push(key.replace('_', ' '));
  }
  return 'call check: ' + facts.join(' · ');
}

function tokensText(step) {
  const parts = [];
  if (step.context_tokens != null) parts.push(`context ${step.context_tokens}`);
  if (step.prompt_tokens != null) parts.push(`prompt ${step.prompt_tokens}`);
  if (step.completion_tokens != null) parts.push(`completion ${step.completion_tokens}`);
  return parts.length ? 'tokens: ' + parts.join(' · ') : '';
}

function section(title, cls, text) {
  return el('div', { class: 'section' }, el('div', { class: 'section-title', text: title }),
            el('pre', { class: cls, text }));
}

// The expandable view of one step: the full reply, the parsed call, how the call
// fared, and a button that fetches the exact messages the model was given.
function replyDetails(step) {
  const summary = step.kind === 'summary' ? 'summary text' : 'full reply';
  const details = el('details', { class: 'reply' },
                     el('summary', { text: `${summary} (${step.response.length} chars)` }));
  if (step.kind === 'summary') {
    details.append(section('Summary', 'reply-text', step.response));
  } else {
    details.append(section('Reply', 'reply-text', step.response));
    const calls = assistantOf(step).tool_calls;
    if (calls && calls.length) details.append(section('Native tool calls', 'native-calls', pretty(calls)));
    details.append(section(
      'Parsed call', 'parsed-call',
      step.action ? pretty(step.action) : 'none: ' + (step.parse_error || 'the reply did not parse')));
  }
  for (const line of [callCheckText(step), tokensText(step)]) {
    if (line) details.append(el('div', { class: 'muted meta', text: line }));
  }
  const raw = (step.info || {}).raw_response;
  if (raw !== undefined) {
    details.append(el('details', { class: 'raw-response' },
                      el('summary', { text: 'raw backend response' }),
                      el('pre', { text: pretty(raw) })));
  }
  const count = step.num_messages !== undefined ? ` ${step.num_messages}` : '';
  const what = step.kind === 'summary' ? 'compressed messages' : 'messages sent to the model';
  const button = el('button', { type: 'button', class: 'load-messages', text: `Show the${count} ${what}` });
  const box = el('div', { class: 'messages', hidden: true });
  button.onclick = () => toggleMessages(step, button, box);
  details.append(el('div', { class: 'section' }, button, box));
  return details;
}

async function toggleMessages(step, button, box) {
  if (box.dataset.loaded) {
    box.hidden = !box.hidden;
    button.textContent = box.hidden ? 'Show the messages' : 'Hide the messages';
    return;
  }
  const sid = current;
  button.disabled = true;
  button.textContent = 'loading…';
  try {
    const full = await api('GET', `/api/sessions/${sid}/steps/${step.step_index}`);
    renderMessages(box, full);
    box.dataset.loaded = '1';
    box.hidden = false;
    button.textContent = 'Hide the messages';
  } catch (e) {
    button.textContent = 'Show the messages';
    say('error: ' + e.message);
  } finally {
    button.disabled = false;
  }
}

function messageItem(message, index, isReply, open) {
  const role = String(message.role || '?');
  const content = message.content == null ? '' : String(message.content);
  let head = `#${index} ${role}`;
  if (message.tool_call_id) head += ` → ${message.tool_call_id}`;
  head += ` · ${content.length} chars`;
  if (message.tool_calls) head += ` · ${message.tool_calls.length} tool call(s)`;
  if (isReply) head += ' · the reply';
  const cls = 'msg role-' + role.replace(/[^a-z]/g, '') + (isReply ? ' reply-msg' : '');
  const item = el('details', { class: cls, open }, el('summary', { text: head }),
                  el('pre', { class: 'msg-content', text: content }));
  const extra = Object.fromEntries(Object.entries(message).filter(([k]) => k !== 'role' && k !== 'content'));
  if (Object.keys(extra).length) item.append(el('pre', { class: 'msg-extra', text: pretty(extra) }));
  return item;
}

// The step's conversation: its messages, then the reply (open: the last input and the reply).
function renderMessages(box, step) {
  const messages = step.messages || [];
  const items = messages.map((m, i) => messageItem(m, i, false, i === messages.length - 1));
  if (step.kind !== 'summary') items.push(messageItem(assistantOf(step), messages.length, true, true));
  const exact = { messages };
  if (step.kind !== 'summary') exact.reply = assistantOf(step);
  items.push(el('details', { class: 'exact-json' }, el('summary', { text: 'exact JSON' }),
                el('pre', { text: pretty(exact) })));
  box.replaceChildren(...items);
}

function flagCell(td, step) {
  // Rebuilt only when the flags change, so that a button is never swapped under the pointer.
  const state = JSON.stringify([step.human_flag, step.human_flag_reason, step.quality, step.quality_reason]);
  if (td.dataset.state === state) return;
  td.dataset.state = state;
  td.className = 'flag';
  const buttons = ['good', 'bad'].map((flag) => {
    const b = el('button', { type: 'button', class: 'flag-' + flag + (step.human_flag === flag ? ' on' : ''),
                             title: 'flag this step ' + flag, 'aria-pressed': String(step.human_flag === flag) },
                 icon(flag), ' ' + flag);
    b.onclick = () => setFlag(step.step_index, flag);
    return b;
  });
  if (step.human_flag) {
    const clear = el('button', { type: 'button', class: 'flag-clear', title: 'remove the flag', text: 'clear' });
    clear.onclick = () => setFlag(step.step_index, null);
    buttons.push(clear);
  }
  const label = step.human_flag ? step.human_flag + (step.human_flag_reason ? ': ' + step.human_flag_reason : '') : '';
  const judged = step.quality && step.quality !== 'unknown'
    ? el('div', { class: 'muted quality', text: 'judge: ' + step.quality + (step.quality_reason ? ' (' + step.quality_reason + ')' : '') })
    : null;
  td.replaceChildren(...buttons, ' ', el('span', { class: 'flag-label', text: label }), judged || '');
}

async function setFlag(index, flag) {
  const reason = flag ? ($('#flag-reason').value || null) : null;
  try {
    await api('POST', `/api/sessions/${current}/steps/${index}/flag`, { flag, reason });
    say(flag ? `step ${index} flagged ${flag}` : `step ${index}: flag removed`);
    const step = shownSteps.get(index);
    if (step) renderStep({ ...step, human_flag: flag, human_flag_reason: reason });
  } catch (e) { say('error: ' + e.message); }
}

function rowClass(step) {
  return [step.kind === 'summary' ? 'summary' : '',
          step.guidance_ids && step.guidance_ids.length ? 'guided' : '',
          step.kind === 'action' && !step.action ? 'unparsed' : '',
          step.human_flag ? 'flag-' + step.human_flag + '-row' : ''].filter(Boolean).join(' ');
}

function observationCell(step) {
  const text = step.kind === 'summary' ? '' : step.observation;
  const td = el('td', { class: 'obs' }, el('span', { class: 'obs-preview', text: preview(text, 400) }));
  if (text.length > 400) {
    td.append(el('details', { class: 'full-obs' },
                 el('summary', { text: `full observation (${text.length} chars)` }),
                 el('pre', { text })));
  }
  return td;
}

function renderStep(step) {
  shownSteps.set(step.step_index, step);
  const tbody = $('#steps tbody');
  const tr = tbody.querySelector(`tr[data-step="${step.step_index}"]`);
  if (tr) {
    // A stored step only changes its flags: update those in place, so that the
    // reply or messages a user has opened stay open.
    tr.className = rowClass(step);
    flagCell(tr.querySelector('td.flag'), step);
    return;
  }
  const action = el('td', { class: 'action' },
                    el('div', { class: 'call-line' }, el('code', { text: actionText(step) }),
                       ...stepBadges(step).map(([cls, label, tip]) =>
                         el('span', { class: 'badge ' + cls, title: tip, text: label }))),
                    replyDetails(step));
  const hours = step.env_hours_after === null ? '' : step.env_hours_after.toFixed(2);
  const fresh = el('tr', { class: rowClass(step), 'data-step': String(step.step_index) },
                   el('td', { text: String(step.step_index) }), el('td', { text: hours }),
                   action, observationCell(step), el('td'));
  flagCell(fresh.lastChild, step);
  // Keep the table in step order whatever order the steps arrive in.
  const last = tbody.lastElementChild;
  if (!last || Number(last.dataset.step) < step.step_index) { tbody.append(fresh); return; }
  const after = [...tbody.children].find((r) => Number(r.dataset.step) > step.step_index);
  tbody.insertBefore(fresh, after || null);
}

async function reloadFlags() {
  // Flags can change on steps already shown; refetch the light step list, page by page.
  const sid = current;
  for (let since = -1; ;) {
    const { steps } = await api('GET', `/api/sessions/${sid}/steps?since=${since}&limit=1000`);
    if (sid !== current) return;
    steps.forEach(renderStep);
    if (steps.length < 1000) return;
    since = steps[steps.length - 1].step_index;
  }
}

function select(id) {
  if (source) source.close();
  current = id;
  shownUpdatedAt = 0;
  $('#detail').hidden = false;
  $('#steps tbody').replaceChildren();
  shownSteps.clear();
  let url = `/api/sessions/${id}/events?since=-1`;
  if (token) url += '&token=' + encodeURIComponent(token);
  source = new EventSource(url);
  source.addEventListener('step', (ev) => renderStep(JSON.parse(ev.data)));
  // Events carry what changed: the first `session` event holds the whole guidance
  // list, later ones only the status fields; each `guidance` event one message.
  let guidance = new Map();
  let latest = null;
  const show = () => showSession({ ...latest, updated_at: Math.max(latest.updated_at, shownUpdatedAt),
                                   guidance: [...guidance.values()] });
  source.addEventListener('session', (ev) => {
    latest = JSON.parse(ev.data);
    if (latest.guidance) guidance = new Map(latest.guidance.map((g) => [g.guidance_id, g]));
    show();
    reloadFlags().catch(() => {});
  });
  source.addEventListener('guidance', (ev) => {
    const g = JSON.parse(ev.data);
    guidance.set(g.guidance_id, g);
    if (latest) show();
  });
  source.addEventListener('end', () => { source.close(); refreshSessions(); });
  refreshSessions();
}

async function control(what) {
  try {
    const r = await api('POST', `/api/sessions/${current}/${what}`, {});
    say(what + (what === 'interrupt' ? (r.interrupted ? ': interrupted the running command' : ': no command was running') : ': ok'));
    showSession(await api('GET', `/api/sessions/${current}`));
  } catch (e) { say('error: ' + e.message); }
}

$('#pause-btn').onclick = () => control('pause');
$('#resume-btn').onclick = () => control('resume');
$('#interrupt-btn').onclick = () => control('interrupt');
$('#stop-btn').onclick = () => control('stop');

$('#guidance-form').onsubmit = async (ev) => {
  ev.preventDefault();
  const text = $('#guidance-text').value.trim();
  if (!text) return;
  try {
    await api('POST', `/api/sessions/${current}/guidance`,
              { text, client_msg_id: (crypto.randomUUID ? crypto.randomUUID() : String(Date.now())) });
    $('#guidance-text').value = '';
    say('guidance buffered: the agent sees it at its next turn');
    showSession(await api('GET', `/api/sessions/${current}`));
  } catch (e) { say('error: ' + e.message); }
};

$('#create-form').onsubmit = async (ev) => {
  ev.preventDefault();
  try {
    const s = await api('POST', '/api/sessions', { seed: Number($('#new-seed').value), paused: $('#new-paused').checked });
    select(s.session_id);
  } catch (e) { say('error: ' + e.message); }
};

refreshSessions();
setInterval(refreshSessions, 2000);
