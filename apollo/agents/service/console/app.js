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

function actionText(step) {
  if (step.kind === 'summary') return 'context summary';
  if (step.action) return `${step.action.tool} ${JSON.stringify(step.action.arguments)}`;
  return 'unparsed: ' + (step.parse_error || '');
}

function flagCell(step) {
  const td = document.createElement('td');
  td.className = 'flag';
  const label = document.createElement('span');
  label.className = 'flag-label';
  label.textContent = step.human_flag ? step.human_flag + (step.human_flag_reason ? ': ' + step.human_flag_reason : '') : '';
  for (const flag of ['good', 'bad']) {
    const b = document.createElement('button');
    b.className = 'flag-' + flag;
    b.textContent = flag === 'good' ? '👍' : '👎';
    b.title = 'flag this step ' + flag;
    b.onclick = async (ev) => {
      ev.stopPropagation();
      try {
        await api('POST', `/api/sessions/${current}/steps/${step.step_index}/flag`,
                  { flag, reason: $('#flag-reason').value || null });
        say(`step ${step.step_index} flagged ${flag}`);
      } catch (e) { say('error: ' + e.message); }
    };
    td.append(b);
  }
  td.append(' ', label);
  return td;
}

function renderStep(step) {
  const tbody = $('#steps tbody');
  let tr = tbody.querySelector(`tr[data-step="${step.step_index}"]`);
  const fresh = document.createElement('tr');
  fresh.dataset.step = step.step_index;
  fresh.className = [step.kind === 'summary' ? 'summary' : '',
                     step.guidance_ids && step.guidance_ids.length ? 'guided' : '',
                     step.human_flag ? 'flag-' + step.human_flag + '-row' : ''].join(' ');
  const cells = [String(step.step_index),
                 step.env_hours_after === null ? '' : step.env_hours_after.toFixed(2),
                 actionText(step),
                 (step.kind === 'summary' ? step.response : step.observation).slice(0, 400)];
  cells.forEach((text, i) => {
    const td = document.createElement('td');
    td.textContent = text;
    if (i === 3) td.className = 'obs';
    fresh.append(td);
  });
  fresh.append(flagCell(step));
  fresh.onclick = () => showDetail(step.step_index);
  if (tr) tr.replaceWith(fresh); else tbody.append(fresh);
}

async function showDetail(index) {
  const step = await api('GET', `/api/sessions/${current}/steps/${index}`);
  const pre = $('#step-detail');
  pre.hidden = false;
  pre.textContent = `step ${index} — ${step.messages.length} messages sent to the model\n\n` +
    `RESPONSE:\n${step.response}\n\nOBSERVATION:\n${step.observation}`;
}

async function reloadFlags() {
  // Flags can change on steps already shown; refetch the light step list.
  const { steps } = await api('GET', `/api/sessions/${current}/steps?since=-1&limit=1000`);
  steps.forEach(renderStep);
}

function select(id) {
  if (source) source.close();
  current = id;
  shownUpdatedAt = 0;
  $('#detail').hidden = false;
  $('#steps tbody').replaceChildren();
  $('#step-detail').hidden = true;
  let url = `/api/sessions/${id}/events?since=-1`;
  if (token) url += '&token=' + encodeURIComponent(token);
  source = new EventSource(url);
  source.addEventListener('step', (ev) => renderStep(JSON.parse(ev.data)));
  source.addEventListener('session', (ev) => {
    const s = JSON.parse(ev.data);
    showSession(s);
    reloadFlags().catch(() => {});
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
