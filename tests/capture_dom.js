// Runs docs/capture.html's script (argv[2], the <script> body) in node with a minimal fake DOM, writes a line with
// pointer events, and prints what it said and saved as JSON; tests/test_generate.py checks the result.
const [script, example] = process.argv.slice(2);
const handlers = {}, els = {}, saved = [], said = [];
const ctx = new Proxy({}, {get: (t, k) => (k in t ? t[k] : () => {}), set: (t, k, v) => { t[k] = v; return true; }});
const canvas = {clientWidth: 800, clientHeight: 260, clientLeft: 1, clientTop: 1, width: 0, height: 0, getContext: () => ctx,
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
const at = (x, y, extra) => ({pointerId: 1, button: 0, buttons: 1, clientX: x + 11, clientY: y + 21, ...extra});
// the canvas at (10, 20) on the page, inside a 1-pixel border

save();                                                   // nothing written
const strokes = JSON.parse(require("fs").readFileSync(example)).strokes;
strokes.forEach((s, n) => {                               // the example line, written by pointer 1
  handlers.pointerdown(at(...s[0]));
  s.slice(1).forEach((p, k) => {
    if (n === 1 && k % 2 === 0) return;                   // stroke 1: two readings per event, as a fast pen gives
    const readings = n === 1 ? [s[k], p].map(q => at(...q)) : [];
    handlers.pointermove({...at(...p), getCoalescedEvents: () => readings});
    if (n === 0 && k === 1) {                             // a second finger (a palm) meanwhile: ignored
      handlers.pointerdown(at(300, 300, {pointerId: 2}));
      handlers.pointermove(at(310, 320, {pointerId: 2}));
      handlers.pointerup(at(310, 320, {pointerId: 2}));
    }
  });
  handlers.pointerup(at(...s[s.length - 1]));
});
handlers.pointerdown(at(50, 50, {button: 2, buttons: 2}));   // a right click (or a pen's eraser): no ink
handlers.pointermove(at(60, 60, {button: -1, buttons: 2}));
handlers.pointerup(at(60, 60, {button: 2, buttons: 0}));
handlers.pointerdown(at(0, 0));                           // a stray dot whose pointerup never came ...
handlers.pointermove(at(1, 1, {buttons: 0}));             // ... ended by the first move with no button down
handlers.pointermove(at(90, 90, {buttons: 0}));           // hovering: not ink
save();                                                   // no text yet
el("undo").onclick();
el("text").value = "  The health  of children today ";
save();
process.stdout.write(JSON.stringify({said, saved, pure: page.primeJson(" a  b ", [[[1.26, 2]], []])}));
