// Runs docs/capture.html's script (argv[2], the <script> body) in node with a minimal fake DOM, writes a line with
// pointer events, and prints what it said and saved as JSON; tests/test_generate.py checks the result.
const [script, example] = process.argv.slice(2);
const handlers = {}, els = {}, saved = [], said = [];
const ctx = new Proxy({}, {get: (t, k) => (k in t ? t[k] : () => {}), set: (t, k, v) => { t[k] = v; return true; }});
const canvas = {clientWidth: 800, clientHeight: 260, width: 0, height: 0, getContext: () => ctx,
  addEventListener: (name, f) => { handlers[name] = f; }, setPointerCapture: () => {},
  getBoundingClientRect: () => ({left: 10, top: 20})};
const el = id => els[id] || (els[id] = id === "board" ? canvas : {value: "", textContent: "", className: ""});
global.window = {devicePixelRatio: 2, addEventListener: () => {}};
global.document = {getElementById: el, body: {appendChild: () => {}},
  createElement: () => ({click() { saved.push(JSON.parse(this.href)); }, remove() {}})};
global.Blob = class { constructor(parts) { this.text = parts.join(""); } };
global.URL = {createObjectURL: blob => blob.text, revokeObjectURL: () => {}};
global.setTimeout = () => {};
const page = require(script);
const save = () => { el("save").onclick(); said.push(el("status").className + ": " + el("status").textContent); };
const at = (x, y) => ({pointerId: 1, clientX: x + 10, clientY: y + 20});   // page coordinates: canvas at (10, 20)

save();                                                   // nothing written
const strokes = JSON.parse(require("fs").readFileSync(example)).strokes;
for (const s of [...strokes, [[0, 0]]]) {                 // the example line, then a stray dot that Undo removes
  handlers.pointerdown(at(...s[0]));
  for (const p of s.slice(1)) handlers.pointermove({...at(...p), getCoalescedEvents: () => []});
  handlers.pointerup();
}
handlers.pointermove(at(5, 5));                           // pen up: not ink
save();                                                   // no text yet
el("undo").onclick();
el("text").value = "  The health  of children today ";
save();
process.stdout.write(JSON.stringify({said, saved, pure: page.primeJson(" a  b ", [[[1.26, 2]], []])}));
