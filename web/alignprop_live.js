// The AlignProp Trainer's live view: a reward plot, progress line, latest preview and LoRA path drawn
// on every AlignProp_Trainer node while it trains, from the server's `alignprop.live` websocket
// messages (nodes/live_view.py). Each message holds only the points added since the previous one;
// when a message does not follow on from what this page holds (a reload, a missed message), the
// page asks GET /alignprop/live for the whole run. Plain ES module, no build step.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_CLASS = "AlignProp_Trainer";
const EVENT = "alignprop.live";
const ROUTE = "/alignprop/live";
const VIEW_HEIGHT = 300;

// node id -> run state ({run, status, step, total, eta_s, points, evals, preview, lora_path, ...})
const runs = new Map();
const VIEW = Symbol("alignprop live view"); // a trainer node's view, kept on the node object

function fmtTime(seconds) {
    if (seconds == null || !isFinite(seconds)) return "?";
    const s = Math.max(0, Math.round(seconds));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
}

function fmt(value) {
    return value == null ? "–" : Number(value).toFixed(4);
}

// Merge one message into the node's run; false when it does not follow on (ask for the whole run).
function merge(message) {
    const node = String(message.node);
    let run = runs.get(node);
    if (!run || run.run !== message.run) {
        if (message.points_from !== 0 || message.evals_from !== 0) return false;
        run = { points: [], evals: [], preview: null, lora_path: null };
        runs.set(node, run);
    }
    if (message.points_from > run.points.length || message.evals_from > run.evals.length) return false;
    run.points.length = message.points_from;
    run.points.push(...message.points);
    run.evals.length = message.evals_from;
    run.evals.push(...message.evals);
    for (const key of ["run", "status", "step", "total", "eta_s", "elapsed_s", "error"]) run[key] = message[key];
    if ("preview" in message) run.preview = message.preview;
    if ("lora_path" in message) run.lora_path = message.lora_path;
    run.received = (run.received || 0) + message.points.length + message.evals.length;
    return true;
}

async function fetchRuns() {
    try {
        const response = await api.fetchApi(ROUTE);
        if (!response.ok) return;
        const body = await response.json();
        for (const message of body.runs || []) {
            runs.delete(String(message.node));
            merge(message);
            draw(String(message.node));
        }
    } catch (error) {
        console.warn("AlignProp live view: could not fetch the runs", error);
    }
}

function onMessage(event) {
    const message = event.detail;
    if (!message || message.node == null) return;
    if (merge(message)) draw(String(message.node));
    else fetchRuns();
}

function makeView(node) {
    const root = document.createElement("div");
    root.className = "alignprop-live";
    root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;" +
        "box-sizing:border-box;padding:4px;font:11px sans-serif;color:var(--input-text,#ddd);overflow:hidden";
    const status = document.createElement("div");
    status.className = "alignprop-live-status";
    status.textContent = "AlignProp live view: waiting for a run";
    const body = document.createElement("div");
    body.style.cssText = "display:flex;gap:4px;flex:1;min-height:0";
    const canvas = document.createElement("canvas");
    canvas.className = "alignprop-live-plot";
    canvas.width = 360;
    canvas.height = 200;
    canvas.style.cssText = "flex:1;min-width:0;height:100%;background:#1b1b1b;border-radius:4px";
    const preview = document.createElement("img");
    preview.className = "alignprop-live-preview";
    preview.style.cssText = "display:none;max-width:40%;max-height:100%;object-fit:contain;border-radius:4px";
    const lora = document.createElement("div");
    lora.className = "alignprop-live-lora";
    lora.style.cssText = "white-space:nowrap;overflow:hidden;text-overflow:ellipsis";
    body.append(canvas, preview);
    root.append(status, body, lora);
    const widget = node.addDOMWidget("alignprop_live", "alignprop_live", root, {
        serialize: false,
        getMinHeight: () => VIEW_HEIGHT,
        getMaxHeight: () => VIEW_HEIGHT,
    });
    widget.serialize = false; // not a value: keeps widgets_values and the prompt as they were
    return { root, status, canvas, preview, lora, widget };
}

function niceRange(values) {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const pad = (hi - lo) * 0.08;
    return [lo - pad, hi + pad];
}

function plot(canvas, run) {
    const rect = canvas.getBoundingClientRect();
    if (rect.width > 10 && rect.height > 10) {
        const scale = window.devicePixelRatio || 1;
        const w = Math.round(rect.width * scale), h = Math.round(rect.height * scale);
        if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    }
    const ctx = canvas.getContext("2d");
    const W = canvas.width, H = canvas.height;
    ctx.clearRect(0, 0, W, H);
    const left = 44, right = 8, top = 8, bottom = 18;
    const raw = run.points.filter((p) => p[1] != null);
    const smooth = run.points.filter((p) => p[2] != null);
    const evals = run.evals.filter((p) => p[1] != null);
    const ys = [...raw.map((p) => p[1]), ...evals.map((p) => p[1])];
    ctx.font = "10px sans-serif";
    ctx.fillStyle = "#999";
    if (!ys.length) {
        ctx.fillText("no reward yet", left, H / 2);
        return;
    }
    const [y0, y1] = niceRange(ys);
    const xMax = Math.max(run.total || 1, ...run.points.map((p) => p[0]), 1);
    const X = (s) => left + (W - left - right) * (s / xMax);
    const Y = (v) => top + (H - top - bottom) * (1 - (v - y0) / (y1 - y0));
    ctx.strokeStyle = "#444";
    ctx.beginPath();
    ctx.moveTo(left, top); ctx.lineTo(left, H - bottom); ctx.lineTo(W - right, H - bottom);
    ctx.stroke();
    ctx.fillText(y1.toPrecision(3), 2, top + 8);
    ctx.fillText(y0.toPrecision(3), 2, H - bottom);
    ctx.fillText("0", left - 3, H - 4);
    ctx.fillText(String(xMax), W - right - 24, H - 4);
    const line = (points, index, color, width) => {
        if (!points.length) return;
        ctx.strokeStyle = color;
        ctx.lineWidth = width;
        ctx.beginPath();
        points.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[index])) : ctx.moveTo(X(p[0]), Y(p[index]))));
        if (points.length === 1) ctx.lineTo(X(points[0][0]) + 2, Y(points[0][index]));
        ctx.stroke();
    };
    line(raw, 1, "rgba(90,160,255,0.45)", 1);
    line(smooth, 2, "rgb(90,160,255)", 2);
    ctx.fillStyle = "rgb(255,170,60)";
    for (const p of evals) {
        ctx.beginPath();
        ctx.arc(X(p[0]), Y(p[1]), 3, 0, 2 * Math.PI);
        ctx.fill();
    }
    line(evals, 1, "rgba(255,170,60,0.8)", 1);
    ctx.lineWidth = 1;
}

function viewOf(nodeId) {
    const graph = app.graph;
    if (!graph) return null;
    const node = graph.getNodeById(nodeId) ?? graph.getNodeById(Number(nodeId));
    return node?.[VIEW] ?? null;
}

function draw(nodeId) {
    const view = viewOf(nodeId);
    const run = runs.get(nodeId);
    if (!view || !run) return;
    const last = run.points.length ? run.points[run.points.length - 1] : null;
    const held = run.evals.length ? run.evals[run.evals.length - 1] : null;
    let text = `${run.status}: step ${run.step}/${run.total}`;
    if (run.status === "running") text += ` · ETA ${fmtTime(run.eta_s)}`;
    text += ` · ${fmtTime(run.elapsed_s)} elapsed`;
    if (last) text += ` · reward ${fmt(last[1])} (smoothed ${fmt(last[2])})`;
    if (held) text += ` · held-out ${fmt(held[1])} @${held[0]}`;
    if (run.error) text += ` · ${run.error}`;
    view.status.textContent = text;
    view.root.dataset.points = String(run.points.length);
    view.root.dataset.evals = String(run.evals.length);
    view.root.dataset.status = run.status;
    view.root.dataset.run = run.run;
    view.lora.textContent = run.lora_path ? `LoRA: ${run.lora_path}` : "";
    if (run.preview && run.preview.filename) {
        const p = run.preview;
        const params = new URLSearchParams({ filename: p.filename, subfolder: p.subfolder || "", type: p.type || "temp" });
        const url = api.apiURL(`/view?${params}`);
        if (view.preview.dataset.src !== url) {
            view.preview.dataset.src = url;
            view.preview.src = url;
        }
        view.preview.title = `step ${p.step}: ${p.prompt} (reward ${fmt(p.reward)})`;
        view.preview.style.display = "";
    }
    plot(view.canvas, run);
    view.root.dataset.drawn = String(run.points.length + run.evals.length);
}

app.registerExtension({
    name: "AlignProp.LiveView",
    async setup() {
        api.addEventListener(EVENT, onMessage);
        api.addEventListener("reconnected", fetchRuns);
        await fetchRuns();
    },
    async nodeCreated(node) {
        if (node.comfyClass !== NODE_CLASS) return;
        node[VIEW] = makeView(node);
        // a loaded workflow gives the node its id after creation, so draw once that is done
        const redraw = () => requestAnimationFrame(() => draw(String(node.id)));
        redraw();
        for (const hook of ["onConfigure", "onResize"]) {
            const previous = node[hook];
            node[hook] = function () {
                const result = previous?.apply(this, arguments);
                redraw();
                return result;
            };
        }
    },
});
