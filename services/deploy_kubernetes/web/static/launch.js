"use strict";
// The launch page: POST a launch, follow its events (or poll its status when the stream is cut),
// show the app's output while it starts, open the app as soon as it is deployed, and explain a
// failure in plain words (the output then opens by itself).
(() => {
  const root = document.getElementById("launch");
  const template = root.dataset.template;
  const urlpath = root.dataset.urlpath || "";
  const base = `/applications/${encodeURIComponent(template)}`;
  const $ = (id) => document.getElementById(id);
  const PHASES = ["request", "starting", "ready"];
  const STATE_TEXT = { pending: "waiting", active: "in progress", done: "done", failed: "failed" };
  let attempt = null;
  let countdown = null;

  const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`;
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function setPhase(name, state) {
    const item = $(`phase-${name}`);
    const previous = item.className;
    item.className = state;
    item.querySelector(".state").textContent = STATE_TEXT[state];
    if (state === "active" && previous !== "active") item.dataset.since = String(performance.now());
    if ((state === "done" || state === "failed") && item.dataset.since) {
      item.querySelector(".time").textContent = seconds(performance.now() - Number(item.dataset.since));
      delete item.dataset.since;
    }
    if (state === "pending") item.querySelector(".time").textContent = "";
  }

  function tick(force) {
    if (!attempt || (attempt.finished && !force)) return;
    $("elapsed").textContent = seconds(performance.now() - attempt.started);
    for (const name of PHASES) {
      const item = $(`phase-${name}`);
      if (item.dataset.since) {
        item.querySelector(".time").textContent = seconds(performance.now() - Number(item.dataset.since));
      }
    }
  }
  setInterval(() => tick(false), 100);

  function note(text) {
    const el = $("connection");
    el.hidden = !text;
    el.textContent = text || "";
  }

  function addProgress(message) {
    $("progress").hidden = false;
    const item = document.createElement("li");
    const when = attempt ? seconds(performance.now() - attempt.started) : "";
    item.textContent = when ? `${when}: ${message}` : message;
    $("progress-list").appendChild(item);
  }

  function showOutput(lines) {
    $("output").hidden = false;
    $("output-lines").textContent = lines.join("\n");
  }

  function retryAfterSeconds(header) {
    if (!header) return null;
    if (/^\d+$/.test(header.trim())) return Number(header.trim());
    const when = Date.parse(header);
    return Number.isNaN(when) ? null : Math.max(0, Math.round((when - Date.now()) / 1000));
  }

  function explainRefusal(response, body) {
    const wait = retryAfterSeconds(response.headers.get("Retry-After"));
    const detail = body && body.error ? `The server said: ${body.error}` : "";
    const soon = wait === null ? "Try again in a little while." : `You can try again in ${wait} s.`;
    switch (body && body.type) {
      case "capacity":
        return { title: "The service is full right now", text: `Every place for an app is taken. ${soon}`, detail, wait };
      case "rateLimited":
        return { title: "Too many launches from your address", text: `You have started many launches in a short time. ${soon}`, detail, wait };
      case "noTemplate":
        return { title: `There is no template named “${template}”`, text: "It may have been removed.", detail, retry: false };
      case "unauthorized":
        return { title: "Launching needs an API key on this server", text: "Ask the operator for access.", detail, retry: false };
      case "badBackend": case "badDatabase": case "badProxy":
        return { title: "The service cannot start apps at the moment", text: "A part of it is not answering. Try again shortly.", detail, wait };
      default:
        return { title: `The server refused the launch (HTTP ${response.status})`, text: soon, detail, wait };
    }
  }

  function explainFailure(dep) {
    const reason = dep.reason || "no reason was recorded";
    const detail = `Reason given by the server: ${reason}`;
    const output = /last output lines: /.test(reason) ? " Its last output is shown below." : "";
    let match = /exited with code (-?\d+)/.exec(reason);
    if (match) {
      return { title: `The app exited with code ${match[1]} while starting`, text: `It stopped before it answered. The template's command or image may be broken.${output}`, detail };
    }
    match = /answered (\d{3}) at (\S+?):/.exec(reason);
    if (match && match[1] === "404") {
      return { title: "The app does not serve its address", text: `It answered 404 (not found) at ${match[2]}: the template's command must make the app serve its base URL.${output}`, detail };
    }
    if (match && match[1] === "403") {
      return { title: "The app refused the request", text: `It answered 403 (forbidden) at ${match[2]}: it may refuse the public host name.${output}`, detail };
    }
    if (match) {
      return { title: `The app answered ${match[1]} instead of its page`, text: `It was started but never answered as a ready app does.${output}`, detail };
    }
    if (/^timed out/.test(reason)) {
      return { title: "The app did not become ready in time", text: "It was started but never answered. Trying again may help if the service is busy.", detail };
    }
    if (/image pull failed/.test(reason)) {
      return { title: "The app's image could not be fetched", text: "The image is missing or unreachable; the operator can preload it.", detail };
    }
    if (/unschedulable/.test(reason)) {
      return { title: "There is no room for the app right now", text: "The cluster has no node with enough resources free. Try again later.", detail };
    }
    if (dep.status === "deleted") {
      return { title: "The launch was stopped", text: "It was stopped before the app was ready.", detail };
    }
    return { title: "The launch failed", text: "Trying again may help.", detail };
  }

  function fail(info) {
    if (attempt) {
      tick(true);
      attempt.finished = true;
      closeStream(attempt);
    }
    for (const name of PHASES) {
      if ($(`phase-${name}`).className === "active") setPhase(name, "failed");
    }
    $("summary").textContent = info.title;
    $("problem-title").textContent = info.title;
    $("problem-text").textContent = info.text || "";
    $("problem-detail").textContent = info.detail || "";
    $("problem").hidden = false;
    if ($("output-lines").textContent) $("output").open = true;
    const retry = $("retry");
    retry.hidden = info.retry === false;
    clearInterval(countdown);
    if (info.wait) {
      let left = info.wait;
      retry.disabled = true;
      retry.textContent = `Try again in ${left} s`;
      countdown = setInterval(() => {
        left -= 1;
        if (left > 0) {
          retry.textContent = `Try again in ${left} s`;
        } else {
          clearInterval(countdown);
          retry.disabled = false;
          retry.textContent = "Try again";
        }
      }, 1000);
    } else {
      retry.disabled = false;
      retry.textContent = "Try again";
    }
    $("problem-title").focus();
  }

  function closeStream(a) {
    if (a.source) {
      a.source.close();
      a.source = null;
    }
  }

  function onStatus(a, dep) {
    if (a !== attempt || a.finished) return;
    if (dep.status === "deployed" && dep.url) {
      tick(true);
      a.finished = true;
      closeStream(a);
      setPhase("starting", "done");
      setPhase("ready", "done");
      $("summary").textContent = "Your app is ready; opening it…";
      $("open-link").href = dep.url;
      $("open").hidden = false;
      window.location.replace(dep.url);
    } else if (dep.status === "failed" || dep.status === "deleted") {
      fail(explainFailure(dep));
    } else {
      $("summary").textContent = "Starting the app…";
    }
  }

  function follow(a) {
    if (!window.EventSource) {
      poll(a);
      return;
    }
    const source = new EventSource(`${base}/${a.id}/events?output=1`);
    a.source = source;
    source.addEventListener("status", (event) => onStatus(a, JSON.parse(event.data)));
    source.addEventListener("output", (event) => {
      let data = null;
      try { data = JSON.parse(event.data); } catch (err) { return; }
      if (a === attempt && data && Array.isArray(data.lines)) showOutput(data.lines.map(String));
    });
    source.addEventListener("progress", (event) => {
      let data = null;
      try { data = JSON.parse(event.data); } catch (err) { return; }
      if (a === attempt && data && typeof data.message === "string") addProgress(data.message);
    });
    source.onerror = () => {
      if (a.finished || a !== attempt) return;
      closeStream(a);
      note("The live updates were cut; checking the status every second instead.");
      poll(a);
    };
  }

  async function poll(a) {
    let failures = 0;
    while (!a.finished && a === attempt) {
      try {
        const response = await fetch(`${base}/${a.id}`, { cache: "no-store" });
        if (response.ok) {
          if (failures) note("The server answers again; checking the status every second.");
          failures = 0;
          onStatus(a, await response.json());
        } else if (response.status === 404) {
          fail({ title: "This launch is no longer known to the server", text: "Start a new one.", detail: "" });
        } else {
          failures += 1;
          note(`The server answered HTTP ${response.status}; still checking.`);
        }
      } catch (err) {
        failures += 1;
        note("The server is unreachable; still trying. Your app may still be starting.");
      }
      await sleep(failures ? Math.min(5000, 1000 * 2 ** (failures - 1)) : 1000);
    }
  }

  function reset() {
    clearInterval(countdown);
    $("problem").hidden = true;
    $("progress").hidden = true;
    $("progress-list").textContent = "";
    $("output").hidden = true;
    $("output").open = false;
    $("output-lines").textContent = "";
    $("open").hidden = true;
    note("");
    for (const name of PHASES) setPhase(name, "pending");
  }

  async function launch() {
    if (attempt) closeStream(attempt);
    reset();
    const a = { started: performance.now(), id: null, finished: false, source: null };
    attempt = a;
    setPhase("request", "active");
    $("summary").textContent = "Asking the server for a launch…";
    let response;
    try {
      const body = urlpath ? JSON.stringify({ urlpath }) : "{}";
      response = await fetch(base, { method: "POST", headers: { "Content-Type": "application/json" }, body });
    } catch (err) {
      fail({ title: "The server is unreachable", text: "Check your connection, then try again.", detail: "" });
      return;
    }
    let body = null;
    try { body = await response.json(); } catch (err) { body = null; }
    if (!response.ok || !body || !body.id) {
      fail(explainRefusal(response, body));
      return;
    }
    a.id = body.id;
    history.replaceState(null, "", `?id=${a.id}`);
    resume(a);
  }

  function resume(a) {
    setPhase("request", "done");
    setPhase("starting", "active");
    $("summary").textContent = "Starting the app…";
    follow(a);
  }

  $("retry").addEventListener("click", () => {
    history.replaceState(null, "", window.location.pathname);
    launch();
  });

  const known = new URLSearchParams(window.location.search).get("id");
  if (known && /^[0-9a-f]{32}$/.test(known)) {
    attempt = { started: performance.now(), id: known, finished: false, source: null };
    resume(attempt);
  } else {
    launch();
  }
})();
