// lorafleet dashboard: draws the job page's SVG charts and keeps the page current by
// polling /api/jobs/{id}/progress; refreshes the jobs and workers tables. Every piece of
// text from the server goes into the page through textContent, never as markup.
(function () {
  'use strict';
  var SVG = 'http://www.w3.org/2000/svg';

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    if (attrs) { Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); }); }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }

  function svgEl(tag, attrs, text) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) { e.textContent = text; }
    return e;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) { return '-'; }
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) { return v.toExponential(2); }
    return v.toFixed(digits);
  }

  function pct(v) { return (v === null || v === undefined) ? '-' : (v * 100).toFixed(1) + '%'; }

  // A line chart of [x, y] points (sorted by x), with optional marker points.
  function drawChart(svg, points, markers, yDigits) {
    var W = 560, H = 260, L = 64, R = 12, T = 12, B = 34;
    var title = svg.querySelector('title');
    while (svg.lastChild) { svg.removeChild(svg.lastChild); }
    if (title) { svg.appendChild(title); }
    svg.setAttribute('data-points', String(points.length));
    var all = points.concat(markers || []);
    if (all.length === 0) {
      svg.appendChild(svgEl('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', 'class': 'empty' }, 'waiting for the first step'));
      return;
    }
    var xs = all.map(function (p) { return p[0]; }), ys = all.map(function (p) { return p[1]; });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys);
    if (x1 === x0) { x1 = x0 + 1; }
    if (y1 === y0) { var pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
    function sx(x) { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    function sy(y) { return T + (1 - (y - y0) / (y1 - y0)) * (H - T - B); }
    var axes = svgEl('g', { 'class': 'axes' });
    axes.appendChild(svgEl('line', { x1: L, y1: H - B, x2: W - R, y2: H - B }));
    axes.appendChild(svgEl('line', { x1: L, y1: T, x2: L, y2: H - B }));
    for (var i = 0; i <= 4; i++) {
      var yv = y0 + (y1 - y0) * i / 4, yy = sy(yv);
      axes.appendChild(svgEl('line', { x1: L, y1: yy, x2: W - R, y2: yy, 'class': 'grid' }));
      axes.appendChild(svgEl('text', { x: L - 6, y: yy + 4, 'text-anchor': 'end' }, fmt(yv, yDigits)));
    }
    [x0, Math.round((x0 + x1) / 2), x1].forEach(function (xv) {
      axes.appendChild(svgEl('text', { x: sx(xv), y: H - B + 18, 'text-anchor': 'middle' }, String(xv)));
    });
    axes.appendChild(svgEl('text', { x: (L + W - R) / 2, y: H - 2, 'text-anchor': 'middle', 'class': 'axis-label' }, 'step'));
    svg.appendChild(axes);
    if (points.length > 0) {
      var d = points.map(function (p) { return sx(p[0]).toFixed(1) + ',' + sy(p[1]).toFixed(1); }).join(' ');
      svg.appendChild(svgEl('polyline', { points: d, 'class': 'line' }));
    }
    (markers || []).forEach(function (p) {
      svg.appendChild(svgEl('circle', { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 4, 'class': 'marker' }));
    });
  }

  function initJob(root) {
    var id = root.getAttribute('data-job');
    var afterEvent = 0, afterLog = Number(root.getAttribute('data-after-log') || '0');
    var loss = new Map(), lr = new Map(), evals = new Map();
    var lossSvg = document.getElementById('loss-chart'), lrSvg = document.getElementById('lr-chart');
    var timer = null;

    function sorted(m) {
      return Array.from(m.entries()).sort(function (a, b) { return a[0] - b[0]; });
    }

    function setText(elId, text) {
      var e = document.getElementById(elId);
      if (e) { e.textContent = text; }
    }

    function renderStatus(j) {
      var st = document.getElementById('st-state');
      if (st) {
        st.textContent = '';
        st.appendChild(el('span', { 'class': 'state state-' + j.state.replace(/[^a-z]/g, '') }, j.state));
      }
      var pr = document.getElementById('st-progress');
      if (pr) {
        pr.textContent = '';
        if (j.total_steps > 0) {
          var p = el('progress', { max: String(j.total_steps), value: String(Math.min(j.step, j.total_steps)),
            'aria-label': Math.round(100 * j.step / j.total_steps) + '% of the steps' });
          pr.appendChild(p);
          pr.appendChild(document.createTextNode(' ' + j.step + '/' + j.total_steps));
        } else {
          pr.textContent = String(j.step);
        }
      }
      setText('st-loss', fmt(j.loss, 4));
      setText('st-attempt', String(j.attempt));
      setText('st-worker', j.worker || '-');
      setText('st-updated', j.updated);
      if (j.error) { setText('st-error', j.error); }
    }

    function renderEvals() {
      var tbody = document.querySelector('#evals tbody');
      if (!tbody || evals.size === 0) { return; }
      tbody.textContent = '';
      sorted(evals).forEach(function (kv) {
        var e = kv[1], tr = el('tr');
        [String(e.step), fmt(e.eval_loss, 4), fmt(e.perplexity, 3), pct(e.exact_match), pct(e.rouge_l)].forEach(function (t) {
          tr.appendChild(el('td', null, t));
        });
        tbody.appendChild(tr);
      });
      var withSamples = sorted(evals).map(function (kv) { return kv[1]; }).filter(function (e) { return e.samples.length > 0; });
      var box = document.getElementById('samples');
      if (box && withSamples.length > 0) {
        var last = withSamples[withSamples.length - 1];
        box.textContent = '';
        box.appendChild(el('p', null, 'At step ' + last.step + ':'));
        var dl = el('dl', { 'class': 'samples' });
        last.samples.forEach(function (s) {
          dl.appendChild(el('dt', null, s.prompt));
          dl.appendChild(el('dd', null, s.completion));
        });
        box.appendChild(dl);
      }
    }

    function renderCheckpoints(cps) {
      var tbody = document.querySelector('#checkpoints tbody');
      if (!tbody || cps.length === 0) { return; }
      tbody.textContent = '';
      cps.slice().reverse().forEach(function (c) {
        var tr = el('tr');
        [String(c.step), String(c.attempt), String(c.epoch), c.created].forEach(function (t) { tr.appendChild(el('td', null, t)); });
        var td = el('td');
        td.appendChild(el('a', { href: '/jobs/' + encodeURIComponent(id) + '/checkpoints/' + c.epoch + '/' + c.step }, 'files'));
        tr.appendChild(td);
        tbody.appendChild(tr);
      });
    }

    function appendLogs(lines) {
      var ol = document.getElementById('logs');
      if (!ol) { return; }
      lines.forEach(function (l) {
        var lvl = ['error', 'warn', 'info', 'debug'].indexOf(l.level) >= 0 ? l.level : 'info';
        var li = el('li', { 'class': 'log-' + lvl });
        li.appendChild(el('span', { 'class': 'ts' }, l.time));
        li.appendChild(document.createTextNode(' '));
        li.appendChild(el('span', { 'class': 'lvl' }, l.level));
        li.appendChild(document.createTextNode(' ' + l.message));
        ol.appendChild(li);
        afterLog = Math.max(afterLog, l.seq);
      });
      while (ol.children.length > 2000) { ol.removeChild(ol.firstChild); }
    }

    function poll() {
      var url = '/api/jobs/' + encodeURIComponent(id) + '/progress?after_event=' + afterEvent + '&after_log=' + afterLog;
      fetch(url, { credentials: 'same-origin', headers: { Accept: 'application/json' } })
        .then(function (r) {
          if (r.status === 401) { window.location.assign('/login?next=' + encodeURIComponent(window.location.pathname)); throw new Error('signed out'); }
          if (!r.ok) { throw new Error('HTTP ' + r.status); }
          return r.json();
        })
        .then(function (p) {
          // A resumed attempt reports its steps again: the newest value of a step wins.
          p.steps.forEach(function (s) {
            if (s[1] !== null) { loss.set(s[0], s[1]); }
            if (s[2] !== null) { lr.set(s[0], s[2]); }
          });
          p.evals.forEach(function (e) { evals.set(e.step, e); });
          afterEvent = p.next_event;
          var marks = sorted(evals).filter(function (kv) { return kv[1].eval_loss !== null; })
            .map(function (kv) { return [kv[0], kv[1].eval_loss]; });
          if (lossSvg) { drawChart(lossSvg, sorted(loss), marks, 3); }
          if (lrSvg) { drawChart(lrSvg, sorted(lr), [], 5); }
          renderStatus(p.job);
          renderEvals();
          renderCheckpoints(p.checkpoints);
          appendLogs(p.logs);
          var more = p.more;
          if (p.job.final && !more) {
            setText('live-note', 'The job is ' + p.job.state + '; the curves show every step metric the coordinator kept.');
            return;
          }
          timer = window.setTimeout(poll, more ? 0 : 2000);
        })
        .catch(function (e) {
          setText('live-note', 'Live updates paused (' + e.message + '); retrying.');
          timer = window.setTimeout(poll, 5000);
        });
    }
    poll();
    window.addEventListener('pagehide', function () { if (timer) { window.clearTimeout(timer); } });
  }

  // Tables marked data-refresh: fetch the page again and swap the table in.
  function initRefresh(table) {
    var every = Number(table.getAttribute('data-refresh')) || 5000;
    function refresh() {
      if (document.hidden) { window.setTimeout(refresh, every); return; }
      fetch(window.location.href, { credentials: 'same-origin' })
        .then(function (r) { if (!r.ok) { throw new Error('HTTP ' + r.status); } return r.text(); })
        .then(function (text) {
          var doc = new DOMParser().parseFromString(text, 'text/html');
          var fresh = doc.getElementById(table.id);
          var cur = document.getElementById(table.id);
          if (fresh && cur) { cur.replaceWith(document.importNode(fresh, true)); }
        })
        .catch(function () { /* keep the table as it is; try again later */ })
        .then(function () { window.setTimeout(refresh, every); });
    }
    window.setTimeout(refresh, every);
  }

  var job = document.getElementById('job');
  if (job) { initJob(job); }
  var t = document.querySelector('table[data-refresh]');
  if (t) { initRefresh(t); }
})();
