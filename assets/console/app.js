// Pier's console: every page is drawn here from the read-only JSON API
// under /api/v1/. Text from the API (names, labels, messages) only ever
// becomes text nodes, never markup.
'use strict';

const main = document.getElementById('main');
const TOKEN_KEY = 'pier-admin-token';
let refresh = null;
// Bumped by every route(): a refresh loop of an older route() stops.
let generation = 0;

// ---- building blocks -------------------------------------------------------

function el(tag, props, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v;
    // Through the CSSOM: the page's policy forbids style attributes.
    else if (k === 'style') node.style.cssText = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  add(node, kids);
  return node;
}

function add(node, kids) {
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    node.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
}

function svg(tag, attrs, ...kids) {
  const node = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  add(node, kids);
  return node;
}

function link(href, ...kids) { return el('a', { href }, ...kids); }

/// An image or repository name as a URL path: each segment encoded, so
/// nothing in a name can add a query, a fragment or a dot-segment.
function pathOf(name) { return name.split('/').map(encodeURIComponent).join('/'); }

function table(head, rows, numeric) {
  const num = new Set(numeric || []);
  return el('div', { class: 'wrap' }, el('table', {},
    el('thead', {}, el('tr', {}, head.map((h, i) =>
      el('th', { scope: 'col', class: num.has(i) ? 'num' : null }, h)))),
    el('tbody', {}, rows.map((cells) => el('tr', {}, cells.map((c, i) =>
      el('td', { class: num.has(i) ? 'num' : null }, c)))))));
}

function card(title, value, ...more) {
  return el('section', { class: 'card' }, el('h2', {}, title), el('div', { class: 'big' }, value), more);
}

function notice(kind, ...kids) {
  return el('div', { class: kind === 'error' ? 'notice error' : 'notice', role: kind === 'error' ? 'alert' : null }, kids);
}

function copyable(command) {
  const button = el('button', { type: 'button', class: 'secondary', 'aria-label': 'Copy: ' + command }, 'Copy');
  button.addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText(command);
      button.textContent = 'Copied';
    } catch (_) {
      button.textContent = 'Select and copy';
    }
    setTimeout(() => { button.textContent = 'Copy'; }, 1500);
  });
  return el('div', { class: 'cmd' }, el('code', {}, command), button);
}

// ---- formatting -------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + ' ' + units[i];
}

function count(n) { return n === null || n === undefined ? '—' : Number(n).toLocaleString('en-US'); }

function plural(n, word, words) { return count(n) + ' ' + (Number(n) === 1 ? word : words || word + 's'); }

function percent(r) { return r === null || r === undefined ? '—' : (r * 100).toFixed(1) + ' %'; }

function seconds(s) {
  if (s === null || s === undefined) return '—';
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
  if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
}

function ago(s) { return s === null || s === undefined ? 'never' : seconds(s) + ' ago'; }

function when(ms) {
  const d = new Date(ms);
  return el('time', { datetime: d.toISOString(), title: d.toISOString() }, d.toLocaleString());
}

function short(digest) { return digest ? digest.replace(/^(sha256:)?(.{12}).*$/, '$1$2…') : '—'; }

// ---- talking to the API --------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  let resp;
  try {
    resp = await fetch(path, options);
  } catch (e) {
    throw new ApiError(0, 'Pier did not answer (' + e.message + '). Is it running?');
  }
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const message = body && body.errors && body.errors[0] ? body.errors[0].message : resp.statusText;
    throw new ApiError(resp.status, message);
  }
  return body;
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function askToken() {
  const input = el('input', { type: 'password', id: 'token-input', autocomplete: 'off', required: true });
  const dialog = el('dialog', { 'aria-labelledby': 'token-title' },
    el('form', { method: 'dialog' },
      el('h2', { id: 'token-title' }, 'Admin token'),
      el('p', { class: 'small muted' }, 'Needed to prewarm images. It is kept in this browser tab only, and sent only to this Pier.'),
      el('label', { for: 'token-input' }, 'Token', input),
      el('div', { class: 'row' },
        el('button', { type: 'submit', value: 'save' }, 'Keep for this session'),
        el('button', { type: 'submit', value: 'forget', class: 'secondary', formnovalidate: true }, 'Forget'),
        el('button', { type: 'submit', value: 'cancel', class: 'secondary', formnovalidate: true }, 'Cancel'))));
  dialog.addEventListener('close', () => {
    if (dialog.returnValue === 'save' && input.value) sessionStorage.setItem(TOKEN_KEY, input.value);
    if (dialog.returnValue === 'forget') sessionStorage.removeItem(TOKEN_KEY);
    dialog.remove();
    tokenLabel();
    route();
  });
  document.body.append(dialog);
  dialog.showModal();
}

function tokenLabel() {
  document.getElementById('token').textContent = token() ? 'Admin token set' : 'Admin token…';
}

// ---- pages ------------------------------------------------------------------

function show(title, ...kids) {
  document.title = title + ' · Pier';
  main.replaceChildren(...kids.flat(Infinity).filter(Boolean));
}

function failed(title, e) {
  show(title, el('h1', {}, title), notice('error', e.message));
}

/// The name to pull through this Pier in examples: the first configured
/// registry, under this host.
function example(stats) {
  const registries = stats ? stats.upstreams.map((u) => u.registry) : [];
  const registry = registries.includes('docker.io') ? 'docker.io' : (registries[0] || 'docker.io');
  const repo = registry === 'docker.io' ? 'library/alpine' : 'pause';
  return location.host + '/' + registry + '/' + repo;
}

function chart(points, key1, key2, label) {
  const w = 600; const h = 90;
  const max = Math.max(1, ...points.map((p) => p[key1] + p[key2]));
  const bw = w / points.length;
  const bars = [];
  points.forEach((p, i) => {
    const a = (p[key1] / max) * (h - 2);
    const b = (p[key2] / max) * (h - 2);
    if (a > 0) bars.push(svg('rect', { class: 'c', x: i * bw + 0.5, y: h - a, width: Math.max(bw - 1, 1), height: a }));
    if (b > 0) bars.push(svg('rect', { class: 'u', x: i * bw + 0.5, y: h - a - b, width: Math.max(bw - 1, 1), height: b }));
  });
  return svg('svg', { class: 'chart', viewBox: '0 0 ' + w + ' ' + h, preserveAspectRatio: 'none', role: 'img', 'aria-label': label },
    svg('title', {}, label), svg('line', { x1: 0, x2: w, y1: h - 0.5, y2: h - 0.5, stroke: 'currentColor', 'stroke-opacity': 0.3 }), bars);
}

async function dashboard() {
  const s = await api('/api/v1/stats');
  for (const p of s.minutes) p.misses = p.requests - p.from_cache;
  const h = s.last_hour; const all = s.all_time;
  const used = s.storage.used_bytes; const budget = s.storage.budget_bytes;
  const storage = card('Storage', bytes(used),
    budget ? el('div', { class: 'small muted' }, 'of ' + bytes(budget) + ' budget · ' + plural(s.storage.blobs, 'blob')) :
      el('div', { class: 'small muted' }, plural(s.storage.blobs, 'blob') + ' · no size budget set'),
    budget ? el('div', { class: used > budget ? 'bar over' : 'bar', role: 'img', 'aria-label': percent(used / budget) + ' of the budget' },
      el('span', { style: 'width:' + Math.min(100, (used / budget) * 100).toFixed(1) + '%' })) : null,
    el('div', { class: 'small muted' }, plural(s.storage.evictions, 'eviction') + ' (' + bytes(s.storage.evicted_bytes) + ')'));
  const nothing = all.requests === 0;
  show('Dashboard',
    el('h1', {}, 'Dashboard'),
    nothing ? notice('info', 'Nothing pulled yet — pull something through ', el('code', {}, example(s)),
      ', or see how Pier reads a name on ', link('/explain', 'Explain a pull'), '.') : null,
    el('div', { class: 'grid' },
      card('Hit ratio, last hour', el('span', { id: 'hit-ratio-hour' }, percent(h.hit_ratio)),
        el('div', { class: 'small muted' }, count(h.from_cache) + ' of ' + count(h.requests) + ' requests from cache')),
      card('Hit ratio, all time', el('span', { id: 'hit-ratio-all' }, percent(all.hit_ratio)),
        el('div', { class: 'small muted' }, count(all.from_cache) + ' of ' + count(all.requests) + ' requests · by bytes ' + percent(all.byte_hit_ratio))),
      card('Served from cache', el('span', { id: 'bytes-cache' }, bytes(all.bytes_from_cache)),
        el('div', { class: 'small muted' }, 'against ' + bytes(all.bytes_fetched) + ' fetched upstream · last hour ' + bytes(h.bytes_from_cache))),
      storage,
      card('In flight', link('/activity', plural(s.in_flight.fetches, 'fetch', 'fetches')),
        el('div', { class: 'small muted' }, plural(s.in_flight.sync_jobs, 'sync job') + ' · ' + plural(s.replicas.length, 'replica')))),
    el('h2', {}, 'Requests per minute, last hour'),
    el('div', { class: 'card' }, chart(s.minutes, 'from_cache', 'misses', 'Requests per minute: from cache and not'),
      el('div', { class: 'legend' }, el('span', {}, el('i', { class: 'swatch-c' }), 'from cache'), el('span', {}, el('i', { class: 'swatch-u' }), 'fetched or waited'))),
    el('h2', {}, 'Bytes served per minute'),
    el('div', { class: 'card' }, chart(s.minutes, 'bytes_from_cache', 'bytes_from_upstream', 'Bytes served per minute: from cache and from upstream'),
      el('div', { class: 'legend' }, el('span', {}, el('i', { class: 'swatch-c' }), 'from cache'), el('span', {}, el('i', { class: 'swatch-u' }), 'from upstream'))),
    el('h2', {}, 'Upstreams'),
    table(['Registry', 'Requests', 'Errors', 'Mean latency', 'Stale serves', 'Rate limit left'],
      s.upstreams.map((u) => [u.registry, count(u.requests),
        el('span', { class: u.errors ? 'no' : null }, count(u.errors)),
        u.mean_latency_ms === null ? '—' : u.mean_latency_ms.toFixed(0) + ' ms',
        count(u.stale_serves), u.ratelimit_remaining === null ? '—' : count(u.ratelimit_remaining)]), [1, 2, 3, 4, 5]),
    el('h2', {}, 'Most pulled'),
    s.top_images.length ? table(['Repository', 'Pulls by tag'], s.top_images.map((t) =>
      [link('/repositories/' + pathOf(t.repository), t.repository), count(t.pulls)]), [1]) :
      el('p', { class: 'muted' }, 'No pulls yet.'),
    el('p', { class: 'small muted' }, 'Figures add up every replica: ',
      s.replicas.map((r, i) => [i ? ', ' : '', r.name]), s.replicas.length ? '' : 'none published yet',
      '. Refreshed every 5 s.'));
}

async function repositories(params) {
  const q = params.get('q') || '';
  const last = params.get('last');
  const query = new URLSearchParams({ q, n: '50' });
  if (last) query.set('last', last);
  const page = await api('/api/v1/repositories?' + query);
  const input = el('input', { type: 'search', id: 'q', name: 'q', value: q, placeholder: 'nginx, library/, quay.io/…', autocomplete: 'off' });
  const form = el('form', { class: 'search', action: '/repositories', role: 'search' },
    el('label', { for: 'q' }, 'Search cached repositories', input),
    el('button', { type: 'submit' }, 'Search'));
  let body;
  if (page.repositories.length) {
    body = [table(['Repository'], page.repositories.map((r) => [link('/repositories/' + pathOf(r), r)])),
      el('div', { class: 'pager' },
        last ? link('/repositories?' + new URLSearchParams({ q }), 'First page') : null,
        page.next ? link('/repositories?' + new URLSearchParams({ q, last: page.next }), 'Next page') : null)];
  } else if (q) {
    body = notice('info', 'No cached repository contains “', q, '”. Pier lists what has been pulled through it; ',
      link('/explain?' + new URLSearchParams({ ref: q }), 'explain “' + q + '”'), ' to see how a pull of it would go.');
  } else {
    body = notice('info', 'Nothing cached yet — pull something through ', el('code', {}, example(null)), ' and it shows here.');
  }
  show(q ? 'Repositories matching ' + q : 'Repositories', el('h1', {}, 'Repositories'), form, body);
}

async function repository(name) {
  let r;
  try {
    r = await api('/api/v1/repositories/' + pathOf(name));
  } catch (e) {
    if (e.status !== 404) throw e;
    show(name, el('h1', {}, name), notice('info', e.message + '. ',
      link('/explain?' + new URLSearchParams({ ref: name }), 'Explain a pull of it'), '.'));
    return;
  }
  show(name, el('h1', {}, name),
    r.tags.length ? table(['Tag', 'Digest', 'Type', 'Platforms', 'Size', 'Confirmed upstream', 'Last pulled'],
      r.tags.map((t) => [link('/images/' + pathOf(name + ':' + t.tag), t.tag),
        el('span', { class: 'digest', title: t.digest }, short(t.digest)),
        mediaType(t.media_type), (t.platforms || []).length ? t.platforms.join(', ') : '—',
        bytes(t.size), ago(t.confirmed_secs_ago), ago(t.pulled_secs_ago)]), [4]) :
      notice('info', 'Blobs of this repository are cached, but no tag is: it was pulled by digest.'),
    el('h2', {}, 'Pull'), pullCommands(name + (r.tags[0] ? ':' + r.tags[0].tag : '')));
}

function mediaType(t) {
  if (!t) return '—';
  const names = {
    'application/vnd.oci.image.index.v1+json': 'OCI index',
    'application/vnd.oci.image.manifest.v1+json': 'OCI image',
    'application/vnd.docker.distribution.manifest.list.v2+json': 'Docker list',
    'application/vnd.docker.distribution.manifest.v2+json': 'Docker image',
  };
  return el('span', { title: t }, names[t] || t);
}

function pullCommands(ref) {
  const box = el('div', {}, el('p', { class: 'muted small' }, 'Loading pull commands…'));
  api('/api/v1/explain?' + new URLSearchParams({ ref })).then((x) => {
    box.replaceChildren(...(x.pull_commands || []).map(copyable));
  }).catch((e) => box.replaceChildren(notice('error', e.message)));
  return box;
}

async function image(name) {
  let v;
  try {
    v = await api('/api/v1/images/' + pathOf(name));
  } catch (e) {
    if (e.status !== 404) throw e;
    show(name, el('h1', {}, name), notice('info', e.message + '. ',
      link('/explain?' + new URLSearchParams({ ref: name }), 'Explain a pull of it'), '.'));
    return;
  }
  const repo = name.replace(/[@:][^/]*$/, '');
  const parts = [el('h1', {}, name),
    el('dl', { class: 'facts' },
      el('dt', {}, 'Repository'), el('dd', {}, link('/repositories/' + pathOf(repo), repo)),
      el('dt', {}, 'Digest'), el('dd', { class: 'digest' }, v.digest),
      el('dt', {}, 'Media type'), el('dd', {}, v.media_type))];
  if (v.platforms && v.platforms.length) {
    parts.push(el('h2', {}, 'Platforms'),
      table(['Platform', 'Digest', 'Cached'], v.platforms.map((p) => [
        link('/images/' + pathOf(repo + '@' + p.digest), p.platform),
        el('span', { class: 'digest', title: p.digest }, short(p.digest)),
        p.cached ? el('span', { class: 'pill ok' }, 'cached') : el('span', { class: 'pill muted' }, 'not pulled')])));
  }
  if (v.layers && v.layers.length) {
    const total = v.layers.reduce((a, l) => a + (l.size || 0), 0);
    const cached = v.layers.filter((l) => l.cached).length;
    parts.push(el('h2', {}, 'Layers'),
      el('p', { class: 'small muted' }, plural(v.layers.length, 'layer') + ', ' + bytes(total) + ' compressed; ' + cached + ' cached.'),
      table(['#', 'Digest', 'Size', 'Cached'], v.layers.map((l, i) => [String(i + 1),
        el('span', { class: 'digest', title: l.digest }, short(l.digest)),
        el('span', { class: 'layer-size', 'data-bytes': l.size }, bytes(l.size)),
        l.cached ? el('span', { class: 'pill ok' }, 'cached') : el('span', { class: 'pill muted' }, 'not cached')]), [0, 2]));
  }
  const c = v.config;
  if (c) {
    const facts = [];
    const fact = (k, val) => { if (val !== undefined && val !== null && val !== '') facts.push(el('dt', {}, k), el('dd', {}, val)); };
    fact('Created', c.created);
    fact('Platform', [c.os, c.architecture].filter(Boolean).join('/'));
    fact('Entrypoint', c.entrypoint ? el('code', {}, JSON.stringify(c.entrypoint)) : null);
    fact('Command', c.cmd ? el('code', {}, JSON.stringify(c.cmd)) : null);
    fact('Exposed ports', c.exposed_ports && c.exposed_ports.length ? c.exposed_ports.join(', ') : null);
    fact('Config', el('span', { class: 'digest' }, short(c.digest) + (c.cached ? '' : ' (not cached)')));
    parts.push(el('h2', {}, 'Configuration'), el('dl', { class: 'facts' }, facts));
    if (c.labels && Object.keys(c.labels).length) {
      parts.push(el('h2', {}, 'Labels'), table(['Label', 'Value'], Object.entries(c.labels).map(([k, val]) => [el('code', {}, k), String(val)])));
    }
    if (c.history && c.history.length) {
      parts.push(el('h2', {}, 'History'), el('ol', { class: 'mono small' }, c.history.map((h) => el('li', {}, h))));
    }
  }
  parts.push(el('h2', {}, 'Signatures, SBOMs and other referrers'), (v.referrers || []).length ?
    table(['Artifact type', 'Digest', 'Cached as tag'], v.referrers.map((r) => [r.artifact_type || '—',
      link('/images/' + pathOf(repo + '@' + r.digest), short(r.digest)), r.tag ? el('code', {}, r.tag) : '—'])) :
    el('p', { class: 'muted' }, 'None cached. They show here once a client such as cosign, notation or oras has fetched them through this mirror.'));
  parts.push(el('h2', {}, 'Pull'), pullCommands(name));
  parts.push(adminActions(name, '/api/v1/images/' + pathOf(name)));
  show(name, parts);
}

async function activity() {
  const a = await api('/api/v1/activity');
  const from = { upstream: 'upstream', peer: 'another replica', bucket: 'the bucket, for a local copy' };
  const fetches = a.fetches.length ? table(['Image', 'Blob', 'Replica', 'From', 'Progress', 'Speed', 'Time left', 'Waiting'],
    a.fetches.map((f) => [link('/repositories/' + pathOf(f.repository), f.repository),
      el('span', { class: 'digest', title: f.digest }, short(f.digest)), f.replica, from[f.origin] || '—',
      el('div', {}, el('progress', { max: f.size || 1, value: f.size ? f.received : 0, 'aria-label': 'Received of ' + short(f.digest) }),
        el('div', { class: 'small' }, bytes(f.received) + (f.size ? ' of ' + bytes(f.size) : ''))),
      f.bytes_per_second ? bytes(f.bytes_per_second) + '/s' : '—', f.eta_seconds === null ? '—' : seconds(f.eta_seconds),
      count(f.waiting)]), [7]) :
    el('p', { class: 'muted' }, 'No cold fetch is running. A pull of an image that is not cached shows here while its layers come in.');
  const jobs = a.jobs.length ? table(['Job', 'State', 'Images', 'Progress', 'Updated'],
    a.jobs.map((j) => {
      const done = j.images.reduce((n, i) => n + i.bytes_done, 0);
      const total = j.images.reduce((n, i) => n + i.bytes_total, 0);
      const errors = j.images.filter((i) => i.error).map((i) => el('div', { class: 'small no' }, i.image + ': ' + i.error));
      return [el('span', { class: 'mono' }, j.id), state(j.state),
        el('div', {}, j.images.map((i) => el('div', {}, i.image + ' ', el('span', { class: 'small muted' }, i.state))), errors),
        el('div', {}, el('progress', { max: total || 1, value: total ? done : 0, 'aria-label': 'Bytes synced for ' + j.id }),
          el('div', { class: 'small' }, bytes(done) + ' of ' + bytes(total))),
        when(j.updated_ms)];
    })) : el('p', { class: 'muted' }, 'No sync jobs yet. Prewarm with ', el('code', {}, 'pier sync'), ' or from ', link('/explain', 'Explain a pull'), '.');
  const failures = a.failures.length ? table(['When', 'Replica', 'Status', 'Request', 'Why'],
    a.failures.map((f) => [when(f.at_ms), f.replica, el('span', { class: 'no' }, String(f.status)),
      el('code', {}, f.method + ' ' + f.path), f.message])) :
    el('p', { class: 'muted' }, 'No failed requests lately.');
  show('Activity', el('h1', {}, 'Activity'),
    el('h2', {}, 'Cold fetches now'), fetches,
    el('h2', {}, 'Sync jobs'), jobs,
    el('h2', {}, 'Recent failures'), failures,
    el('p', { class: 'small muted' }, 'Refreshed every 2 s.'));
}

function state(s) {
  const kind = { done: 'ok', failed: 'no', retrying: 'warn' }[s] || '';
  return el('span', { class: 'pill ' + kind }, s);
}

async function explain(params) {
  const ref = params.get('ref') || '';
  const input = el('input', { type: 'search', id: 'ref', name: 'ref', value: ref, autocomplete: 'off',
    placeholder: 'nginx:1.27, docker pull ghcr.io/org/app, https://hub.docker.com/_/redis' });
  const form = el('form', { class: 'search', action: '/explain' },
    el('label', { for: 'ref' }, 'An image, as you would pull it', input),
    el('button', { type: 'submit' }, 'Explain'));
  if (!ref) {
    show('Explain a pull', el('h1', {}, 'Explain a pull'), form,
      el('p', { class: 'muted' }, 'Type an image the way you would give it to docker pull, or paste a whole pull command or a Docker Hub link. Pier shows how it reads the name, whether it may be pulled, what is cached, and the commands to use. Nothing is fetched.'));
    return;
  }
  const x = await api('/api/v1/explain?' + new URLSearchParams({ ref }));
  const parts = [el('h1', {}, 'Explain a pull'), form];
  if (x.error) {
    parts.push(notice('error', el('strong', {}, x.error.code.replace(/_/g, ' ') + ': '), x.error.message));
  }
  if (x.routed) {
    const r = x.routed;
    parts.push(el('h2', {}, 'How Pier reads it'), el('dl', { class: 'facts', id: 'reading' },
      el('dt', {}, 'Read as'), el('dd', {}, el('code', {}, x.reference)),
      el('dt', {}, 'Naming mode'), el('dd', {}, r.mode),
      el('dt', {}, 'Upstream'), el('dd', {}, r.registry),
      el('dt', {}, 'Image'), el('dd', { id: 'normalized' }, el('code', {}, r.normalized)),
      el('dt', {}, 'Route rule'), el('dd', {}, r.route ? el('code', {}, r.route) : 'none')));
  }
  if (x.access) {
    parts.push(el('h2', {}, 'Access'), x.access.allowed ?
      el('p', { id: 'access' }, el('span', { class: 'pill ok' }, 'allowed'), ' The access rules admit it.') :
      el('p', { id: 'access' }, el('span', { class: 'pill no' }, 'denied'), ' ', x.access.message || 'The access rules refuse it.'));
  }
  if (x.cached) {
    const c = x.cached;
    parts.push(el('h2', {}, 'In the cache'), el('dl', { class: 'facts' },
      el('dt', {}, 'Manifest'), el('dd', {}, c.manifest ? el('span', { class: 'pill ok' }, 'cached') : el('span', { class: 'pill' }, 'not cached')),
      c.digest ? [el('dt', {}, 'Digest'), el('dd', { class: 'digest' }, c.digest)] : null,
      c.tag_confirmed_secs_ago !== undefined && c.tag_confirmed_secs_ago !== null ?
        [el('dt', {}, 'Tag confirmed'), el('dd', {}, ago(c.tag_confirmed_secs_ago))] : null,
      c.platforms && c.platforms.length ? [el('dt', {}, 'Platforms'), el('dd', {}, c.platforms.map((p) =>
        el('span', { class: (c.platforms_cached || []).includes(p) ? 'pill ok' : 'pill' }, p)).reduce((acc, n) => acc.concat(n, ' '), []))] : null),
    c.manifest && x.routed ? el('p', {}, link('/images/' + pathOf(x.routed.registry + '/' + x.routed.repository +
      (x.routed.tag_or_digest.includes(':') ? '@' : ':') + x.routed.tag_or_digest), 'See the image')) : null);
  }
  if (x.pull_would) parts.push(el('h2', {}, 'A pull now would'), el('p', { id: 'pull-would' }, x.pull_would));
  if (x.pull_commands && x.pull_commands.length) {
    const allowed = !x.access || x.access.allowed;
    parts.push(el('h2', {}, allowed ? 'Pull it' : 'The commands, once the access rules allow it'), x.pull_commands.map(copyable));
  }
  if (x.routed && x.access && x.access.allowed) {
    const r = x.routed;
    const cached = x.cached && x.cached.manifest ? '/api/v1/images/' + pathOf(r.registry + '/' + r.repository +
      (r.tag_or_digest.includes(':') ? '@' : ':') + r.tag_or_digest) : null;
    parts.push(adminActions(r.normalized, cached));
  }
  show('Explain ' + ref, parts);
}

/// Prewarm and purge, for whoever gave the admin token. `cachedAt` is the
/// image's API path when the cache holds it.
function adminActions(image, cachedAt) {
  if (!token()) {
    return el('div', {}, el('h2', {}, 'Prewarm or purge'), el('p', { class: 'muted' },
      'With the admin token, this page can bring the image in before anyone pulls it, or purge it so the next pull asks upstream again. ',
      el('button', { type: 'button', class: 'link', onclick: askToken }, 'Give the token'), '.'));
  }
  const out = el('div', { role: 'status' });
  const run = (button, work) => async () => {
    button.disabled = true;
    try {
      out.replaceChildren(await work());
    } catch (e) {
      out.replaceChildren(notice('error', e.status === 401 || e.status === 403 ?
        'The admin token was refused: ' + e.message : e.message));
    } finally {
      button.disabled = false;
    }
  };
  const auth = () => ({ authorization: 'Bearer ' + token() });
  const warm = el('button', { type: 'button' }, 'Prewarm');
  warm.addEventListener('click', run(warm, async () => {
    const job = await api('/api/v1/sync', {
      method: 'POST',
      headers: Object.assign({ 'content-type': 'application/json' }, auth()),
      body: JSON.stringify({ images: [image] }),
    });
    return notice('info', 'Prewarm job ', el('code', {}, job.id), ' started: follow it on ', link('/activity', 'Activity'), '.');
  }));
  const buttons = [warm];
  if (cachedAt) {
    const purge = el('button', { type: 'button', class: 'secondary' }, 'Purge from cache');
    purge.addEventListener('click', () => {
      if (!confirm('Purge ' + image + '? Its tags are forgotten and the next pull asks upstream again. Layers stay until the cache budget removes them.')) return;
      run(purge, async () => {
        const gone = await api(cachedAt, { method: 'DELETE', headers: auth() });
        return notice('info', 'Purged ', el('code', {}, gone.digest), gone.tags.length ? ' and its tags ' + gone.tags.join(', ') : '', '. The next pull asks upstream again.');
      })();
    });
    buttons.push(purge);
  }
  return el('div', {}, el('h2', {}, 'Prewarm or purge'), el('p', { class: 'small muted' }, 'As ', el('code', {}, image), '.'),
    el('div', { class: 'row' }, buttons), out);
}

// ---- routing ------------------------------------------------------------------

const pages = [
  [/^\/$/, () => dashboard, 5000, 'Dashboard'],
  [/^\/repositories\/?$/, (m, q) => () => repositories(q), 0, 'Repositories'],
  [/^\/repositories\/(.+)$/, (m) => () => repository(m[1]), 0, 'Repository'],
  [/^\/images\/(.+)$/, (m) => () => image(m[1]), 0, 'Image'],
  [/^\/activity\/?$/, () => activity, 2000, 'Activity'],
  [/^\/explain\/?$/, (m, q) => () => explain(q), 0, 'Explain a pull'],
];

async function route() {
  clearTimeout(refresh);
  const mine = ++generation;
  let path;
  try {
    path = location.pathname.split('/').map(decodeURIComponent).join('/');
  } catch (_) {
    path = null;
  }
  const params = new URLSearchParams(location.search);
  for (const a of document.querySelectorAll('.top nav a')) {
    const href = a.getAttribute('href');
    const here = href === '/' ? path === '/' : path.startsWith(href);
    if (here) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
  }
  const found = path === null ? null : pages.find(([re]) => re.test(path));
  if (!found) {
    show('Not found', el('h1', {}, 'No such page'), notice('info', 'Try the ', link('/', 'dashboard'), '.'));
    return;
  }
  const [re, make, every, title] = found;
  const draw = make(path.match(re), params);
  const tick = async () => {
    try {
      await draw();
    } catch (e) {
      if (mine === generation) failed(title, e);
    }
    if (mine === generation && every && !document.hidden) refresh = setTimeout(tick, every);
  };
  await tick();
}

document.addEventListener('visibilitychange', () => { if (!document.hidden) route(); });
document.getElementById('token').addEventListener('click', askToken);
tokenLabel();
route();
