// chat.mjs: Debian's chromium, driven by Playwright, against mcchatd's chat page, beside CLI
// peers. Run by crates/mcchat/tests/integration/browser.rs inside the test namespace, which
// passes everything in the environment:
//   MCCHATD_BIN, MCCHAT_BIN   the binaries
//   MCCHAT_ROOMS              the rooms file (room1, room2)
//   WEB_PORT                  the port the page is served on (fixed: it survives a restart)
//   STATE_DIR                 the daemon's history
//   SHOT_DIR                  where the screenshots go
//   CHROMIUM                  the browser (default /usr/bin/chromium)
// Prints one line per step; exits non-zero with the reason on the first failure.
import { spawn } from "node:child_process";
import { once } from "node:events";
import { chromium } from "playwright-core";

const env = process.env;
const url = `http://127.0.0.1:${env.WEB_PORT}/`;
const children = [];
const step = (what) => console.log(`browser: ${what}`);
function fail(why) {
  console.error(`browser: FAILED: ${why}`);
  for (const c of children) c.kill("SIGKILL");
  process.exit(1);
}
process.on("unhandledRejection", (e) => fail(e && e.stack ? e.stack : String(e)));

// A child with its stderr watched: `waitErr(text)` resolves when a line contains it.
function start(label, bin, args, input = false) {
  const childEnv = { ...env, NO_COLOR: "1" };
  delete childEnv.RUST_LOG;
  delete childEnv.MCCHAT_NAME;
  const child = spawn(bin, args, {
    env: childEnv,
    stdio: [input ? "pipe" : "ignore", "pipe", "pipe"],
  });
  children.push(child);
  const err = [], out = [];
  const waiters = [];
  const feed = (buf, lines) => (chunk) => {
    buf.text = (buf.text || "") + chunk;
    let i;
    while ((i = buf.text.indexOf("\n")) >= 0) {
      const l = buf.text.slice(0, i);
      buf.text = buf.text.slice(i + 1);
      lines.push(l);
      for (const w of waiters) if (!w.done && l.includes(w.text)) { w.done = true; w.resolve(l); }
    }
  };
  child.stderr.setEncoding("utf8").on("data", feed({}, err));
  child.stdout.setEncoding("utf8").on("data", feed({}, out));
  const waitFor = (lines, text, ms = 10000) => {
    const hit = lines.find((l) => l.includes(text));
    if (hit) return Promise.resolve(hit);
    return new Promise((resolve, reject) => {
      const w = { text, resolve, done: false };
      waiters.push(w);
      setTimeout(() => { if (!w.done) reject(new Error(`${label}: no "${text}" within ${ms} ms; stderr: ${err.slice(-5).join(" | ")}`)); }, ms);
    });
  };
  return { child, err, out, waitErr: (t, ms) => waitFor(err, t, ms), waitOut: (t, ms) => waitFor(out, t, ms) };
}

function daemon() {
  const d = start("mcchatd", env.MCCHATD_BIN, [
    "--listen", "127.0.0.1:0", "--status-socket", "", "--web", `127.0.0.1:${env.WEB_PORT}`,
    "--state-dir", env.STATE_DIR,
  ]);
  return d;
}

async function stop(p) {
  if (p.child.exitCode !== null) return;
  p.child.kill("SIGTERM");
  await once(p.child, "exit");
}

const texts = (page) => page.locator("#log li").allTextContents();
async function until(what, fn, ms = 10000) {
  const end = Date.now() + ms;
  for (;;) {
    if (await fn()) return;
    if (Date.now() > end) fail(`timed out: ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
const count = (lines, needle) => lines.filter((l) => l.includes(needle)).length;

let d = daemon();
await d.waitErr("mcchatd ready");
step("mcchatd serves the page");

const browser = await chromium.launch({
  executablePath: env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
async function open(name, room, width = 1280) {
  const ctx = await browser.newContext({ viewport: { width, height: 800 } });
  await ctx.addInitScript(([n, r]) => {
    if (!localStorage.getItem("mcchat.name")) localStorage.setItem("mcchat.name", n);
    if (!localStorage.getItem("mcchat.room")) localStorage.setItem("mcchat.room", r);
  }, [name, room]);
  const page = await ctx.newPage();
  page.on("dialog", (dlg) => fail(`a dialog opened: ${dlg.message()}`));
  page.on("pageerror", (e) => fail(`page error: ${e.message}`));
  await page.goto(url);
  await until(`${name} in ${room}`, async () => (await page.locator("#state").textContent()) === `in ${room} as ${name}`);
  return page;
}
const ann = await open("ann", "room1");
const bob = await open("bob", "room1");
const zed = await open("zed", "room2");
step("two pages in room1, one in room2");

const listen = start("listen", env.MCCHAT_BIN, ["listen", "room1", "--json"]);
await listen.waitErr("listening to");
async function say(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}
await say(ann, "hello from ann");
await until("bob sees ann", async () => count(await texts(bob), "hello from ann") === 1);
await listen.waitOut("hello from ann");
step("a page's message reaches the other page and the CLI");

const sent = start("send", env.MCCHAT_BIN, ["send", "room1", "--name", "cli", "hello from cli"]);
await once(sent.child, "exit");
for (const p of [ann, bob]) await until("pages see the CLI", async () => count(await texts(p), "hello from cli") === 1);
step("the CLI's message reaches both pages once");

await say(bob, "<img src=x onerror=alert(1)>");
await until("ann sees the markup as text", async () => count(await texts(ann), "<img src=x onerror=alert(1)>") === 1);
if ((await ann.locator("#log img").count()) !== 0) fail("network text became HTML");
await listen.waitOut("onerror");
step("markup shows as text");

if ((await texts(zed)).some((l) => l.includes("hello") || l.includes("onerror"))) fail("room2 saw room1");
step("room2 saw nothing of room1");

await ann.reload();
await until("ann back in room1", async () => (await ann.locator("#state").textContent()) === "in room1 as ann");
await until("scrollback", async () => count(await texts(ann), "hello from cli") === 1);
const afterReload = await texts(ann);
for (const t of ["hello from ann", "hello from cli", "<img src=x onerror=alert(1)>"]) {
  if (count(afterReload, t) !== 1) fail(`after a reload "${t}" is shown ${count(afterReload, t)} times`);
}
step("a reload shows the scrollback once");

// A CLI peer keeps sending while mcchatd restarts.
const pump = start("pump", env.MCCHAT_BIN, ["join", "room1", "--name", "pump"], true);
await pump.waitErr("joined");
const N = 40;
let restarted = null;
for (let i = 1; i <= N; i++) {
  pump.child.stdin.write(`n${i}\n`);
  if (i === 10) {
    await stop(d);
    step("mcchatd stopped");
    restarted = (async () => {
      await new Promise((r) => setTimeout(r, 800));
      d = daemon();
      await d.waitErr("mcchatd ready");
      step("mcchatd started again");
    })();
  }
  await new Promise((r) => setTimeout(r, 100));
}
await restarted;
await until("the banner goes", async () => !(await ann.locator("#banner").isVisible()), 15000);
for (const [name, p] of [["ann", ann], ["bob", bob]]) {
  await until(`${name} has every message`, async () => {
    const l = await texts(p);
    for (let i = 1; i <= N; i++) if (count(l, `n${i}`) < 1) return false;
    return true;
  }, 20000);
  const seen = (await texts(p))
    .filter((t) => t.includes("pump"))
    .map((t) => (t.match(/n(\d+)$/) || [])[1])
    .filter(Boolean)
    .map(Number);
  for (let i = 1; i <= N; i++) {
    if (seen.filter((x) => x === i).length !== 1) fail(`${name} shows n${i} ${seen.filter((x) => x === i).length} times: ${seen.join(",")}`);
  }
  if (seen.join(",") !== [...Array(N).keys()].map((i) => i + 1).join(",")) fail(`${name}: out of order: ${seen.join(",")}`);
  if ((await texts(p)).some((t) => t.includes("were lost"))) fail(`${name} shows a gap`);
}
step("after a restart every message once, in order, no gap");

for (const width of [375, 1280]) {
  await bob.setViewportSize({ width, height: width === 375 ? 740 : 800 });
  for (const sel of ["#room", "#name", "#log", "#text", "#say button"]) {
    const box = await bob.locator(sel).boundingBox();
    if (!box || box.width <= 0 || box.x < 0 || box.x + box.width > width + 1) fail(`${sel} is not on screen at ${width} px: ${JSON.stringify(box)}`);
  }
  await bob.screenshot({ path: `${env.SHOT_DIR}/page-${width}.png` });
}
step("screenshots at 375 and 1280 px, main elements on screen");

await browser.close();
for (const p of [pump, listen, d]) await stop(p);
console.log("browser: ok");
