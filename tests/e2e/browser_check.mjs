// Drives the real ComfyUI frontend in headless Chromium (Playwright) against a running server with
// this pack; run by tests/e2e/test_browser.py. Prints what it checked; exits 1 on the first failure
// (layout problems are collected over every workflow and reported together at the end). Every request
// that is not to 127.0.0.1 is aborted (the stock frontend tries to reach api.comfy.org and others).
//
//   node tests/e2e/browser_check.mjs --url http://127.0.0.1:PORT --screenshots DIR WORKFLOW.json...
// env: SANA_CHROMIUM (default /usr/bin/chromium), SANA_PLAYWRIGHT_DIR (a folder whose node_modules
// holds playwright-core; default ~/.cache/sana-browser).
import assert from 'node:assert/strict'
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createRequire } from 'node:module'
import { homedir, tmpdir } from 'node:os'
import { basename, dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { parseArgs } from 'node:util'

import { nodeBox, outsideView, overlaps, viewBox } from '../../js/sana_logic.js'

const { values: args, positionals: workflows } = parseArgs({
  options: { url: { type: 'string' }, screenshots: { type: 'string' }, 'run-timeout': { type: 'string', default: '240' } },
  allowPositionals: true
})
const playwrightDir = process.env.SANA_PLAYWRIGHT_DIR || join(homedir(), '.cache', 'sana-browser')
const { chromium } = createRequire(join(playwrightDir, 'noop.js'))('playwright-core')
const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'
]
const log = (...a) => console.log(...a)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

mkdirSync(args.screenshots, { recursive: true })
const profile = mkdtempSync(join(tmpdir(), 'sana-chromium-profile-'))
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.SANA_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: FLAGS,
  viewport: { width: 1600, height: 1000 }
})
const outside = [] // requests to other hosts, aborted
await context.route(
  (url) => url.hostname !== '127.0.0.1',
  (route) => {
    outside.push(new URL(route.request().url()).host)
    return route.abort()
  }
)
let page // the page under test; helpers below act on it

// Console errors and uncaught exceptions. The stock frontend logs some by itself (404s for optional
// user files on a fresh user directory, api.comfy.org unreachable offline, its own startup bugs):
// a first page with this pack's js/ served empty records them, and only errors beyond those fail.
// The browser's own favicon request (once per profile, so not reliably in the baseline) is ignored.
const consoleErrors = []
let baseline = new Set()
const normalize = (e) => e.replace(/([?&]rand=)[\d.]+/g, '$1*') // the frontend's cache-busting query
function watch(p) {
  p.on('console', (m) => {
    const url = m.location().url || 'no url'
    if (m.type() === 'error' && !/\/favicon\.ico$/.test(url)) consoleErrors.push(normalize(`${m.text()} (${url})`))
  })
  p.on('pageerror', (e) => consoleErrors.push(normalize(`uncaught: ${e.stack || e.message}`)))
}
function expectNoConsoleErrors(when) {
  assert.deepEqual(consoleErrors.filter((e) => !baseline.has(e)), [], `console errors ${when}`)
}

async function openApp({ sana }) {
  page = await context.newPage()
  if (!sana) {
    await page.route(/\/extensions\/[^?]*\/sana(_logic)?\.js(\?.*)?$/, (route) =>
      route.fulfill({ contentType: 'text/javascript', body: '' })
    )
  }
  watch(page)
  await page.goto(args.url)
  await page.waitForFunction(
    (sana) => window.app?.graph && window.app.canvas && (!sana || window.app.extensions?.some((e) => e.name === 'SANA.frontend')),
    sana,
    { timeout: 90000 }
  )
  await sleep(1500) // first-run dialogs (templates) open after the app is up
  await closeDialogs()
  const registered = await page.evaluate(() => window.app.extensions.some((e) => e.name === 'SANA.frontend'))
  assert.equal(registered, sana, `SANA.frontend registered: ${registered}`)
}

async function shot(name) {
  const path = join(args.screenshots, `${name}.png`)
  await page.screenshot({ path })
  log(`screenshot: ${path}`)
  return path
}

async function closeDialogs() {
  for (let i = 0; i < 5 && (await page.locator('.p-dialog:visible').count()); i++) {
    await page.keyboard.press('Escape')
    await sleep(300)
  }
}

async function frame() {
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))))
}

// Screen point of a widget (centre, or x fraction of the node width), after centring the node at zoom 1.
async function widgetPoint(nodeId, widgetName, fraction = 0.5) {
  await page.evaluate((id) => {
    const node = window.app.graph.getNodeById(id)
    window.app.canvas.ds.scale = 1
    window.app.canvas.centerOnNode(node)
    window.app.canvas.setDirty(true, true)
  }, nodeId)
  await frame()
  return page.evaluate(
    ({ id, name, fraction }) => {
      const node = window.app.graph.getNodeById(id)
      const widget = node.widgets.find((w) => w.name === name)
      const [x, y] = window.app.canvas.ds.convertOffsetToCanvas([
        node.pos[0] + node.size[0] * fraction,
        node.pos[1] + widget.y + 10 // widgets are 20 px tall
      ])
      const rect = window.app.canvas.canvas.getBoundingClientRect()
      return [rect.left + x, rect.top + y]
    },
    { id: nodeId, name: widgetName, fraction }
  )
}

// The user opens a combo, types `text` into the menu's filter and presses Enter (picking the first
// entry shown). Returns the entries the filter showed.
async function pickFromCombo(nodeId, widgetName, text) {
  const [x, y] = await widgetPoint(nodeId, widgetName)
  await page.mouse.click(x, y)
  const filter = page.locator('.litecontextmenu .comfy-context-menu-filter')
  await filter.waitFor({ timeout: 5000 })
  await filter.fill(text)
  const shown = await page.locator('.litecontextmenu .litemenu-entry:visible').allInnerTexts()
  await filter.press('Enter')
  await page.locator('.litecontextmenu').waitFor({ state: 'detached', timeout: 5000 })
  return shown
}

// The user clicks a number widget and types a value into its prompt.
async function typeNumber(nodeId, widgetName, value) {
  const [x, y] = await widgetPoint(nodeId, widgetName)
  await page.mouse.click(x, y)
  const input = page.locator('.graphdialog input')
  await input.waitFor({ timeout: 5000 })
  await input.fill(String(value))
  await input.press('Enter')
  await page.locator('.graphdialog').waitFor({ state: 'detached', timeout: 5000 })
}

const nodesState = () =>
  page.evaluate(() =>
    window.app.graph.nodes.map((n) => ({
      id: n.id,
      type: n.type,
      comfyClass: n.comfyClass ?? null,
      hasErrors: !!n.has_errors,
      placeholder: !!n.last_serialization, // what LiteGraph makes for an unknown type
      size: [...n.size],
      widgets: Object.fromEntries((n.widgets || []).map((w) => [w.name, w.value])),
      options: Object.fromEntries((n.widgets || []).filter((w) => w.type === 'combo').map((w) => [w.name, w.options.values])),
      lines: n.sanaLines ? n.sanaLines() : null,
      stats: n.sanaStats ?? null
    }))
  )

const LOADERS = ['SanaModelLoader', 'SanaTextEncoderLoader', 'SanaVAELoader', 'SanaLoraLoader']
const FILE_WIDGET = { SanaModelLoader: 'model_name', SanaTextEncoderLoader: 'text_encoder_name', SanaVAELoader: 'vae_name', SanaLoraLoader: 'lora_name' }

async function loadWorkflow(workflow, name) {
  await page.evaluate(({ wf, name }) => window.app.loadGraphData(wf, true, true, name), { wf: workflow, name })
  await sleep(500)
  await frame()
}

// --- Layout: node rectangles (title bar, warnings and stats included) that cover each other, or fall
// outside the workflow's saved view of the canvas. Collected over all workflows, reported at the end.
const layoutProblems = []
async function checkLayout(name, state, { view }) {
  const { nodes, title, ds, canvas } = await page.evaluate(() => ({
    nodes: window.app.graph.nodes
      .filter((n) => !n.flags?.collapsed)
      .map((n) => ({ id: n.id, type: n.type, pos: [...n.pos], size: [...n.size] })),
    title: window.LiteGraph.NODE_TITLE_HEIGHT,
    ds: { offset: [...window.app.canvas.ds.offset], scale: window.app.canvas.ds.scale },
    canvas: [window.app.canvas.canvas.clientWidth, window.app.canvas.canvas.clientHeight]
  }))
  const boxes = nodes.map((n) => ({ id: `#${n.id} ${n.type}`, box: nodeBox(n.pos, n.size, title) }))
  const where = (id) => boxes.find((b) => b.id === id).box.map(Math.round).join(',')
  const found = overlaps(boxes).map(([a, b]) => `${name}, ${state}: ${a} [${where(a)}] overlaps ${b} [${where(b)}]`)
  if (view) {
    const shown = viewBox(ds.offset, ds.scale, ...canvas).map(Math.round)
    found.push(...outsideView(boxes, shown).map((id) => `${name}, ${state}: ${id} [${where(id)}] is outside the saved view [${shown}] (${canvas.join('x')} px canvas)`))
  }
  for (const problem of found) log(`  LAYOUT: ${problem}`)
  layoutProblems.push(...found)
}

const sizesOf = async () =>
  Object.fromEntries((await nodesState()).map((n) => [n.id, n.size.map((v) => Math.round(v * 10) / 10)]))

// The open workflow tabs, and a click on one of them (ComfyUI reloads the graph from its saved state).
const activeTab = () =>
  page.evaluate(() => {
    const store = window.app.extensionManager.workflow
    return { index: store.openWorkflows.indexOf(store.activeWorkflow), count: store.openWorkflows.length, path: store.activeWorkflow.path }
  })
async function clickTab(index) {
  await page.locator('.workflow-tabs .p-togglebutton').nth(index).click()
  await page.waitForFunction((i) => {
    const store = window.app.extensionManager.workflow
    return store.openWorkflows.indexOf(store.activeWorkflow) === i
  }, index)
  await sleep(500)
  await frame()
}

// The user drops a saved workflow file on the page (a new tab opens with it).
async function dropWorkflow(json, fileName) {
  const before = await activeTab()
  await page.evaluate(
    ({ json, fileName }) => {
      const data = new DataTransfer()
      data.items.add(new File([json], fileName, { type: 'application/json' }))
      document.querySelector('canvas').dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }))
    },
    { json, fileName }
  )
  await page.waitForFunction((count) => window.app.extensionManager.workflow.openWorkflows.length > count, before.count)
  await sleep(500)
  await frame()
}

const sanaToasts = () => page.locator('.p-toast-message', { hasText: 'SANA:' }).count()

try {
  // --- Baseline: the same frontend and workflows without this pack's js/.
  await openApp({ sana: false })
  for (const file of workflows) await loadWorkflow(JSON.parse(readFileSync(file, 'utf8')), basename(file))
  baseline = new Set(consoleErrors)
  log(`baseline without js/: ${baseline.size} console errors from the stock frontend (ignored below):`)
  for (const e of baseline) log(`  - ${e.split('\n')[0]}`)
  await page.close()

  await openApp({ sana: true })
  expectNoConsoleErrors('on startup')
  log(`frontend up at ${args.url}; SANA.frontend registered`)

  // --- Round-1 values in an API prompt (a preset label of round 1's list, the text encoder's "gpu") pass
  // ComfyUI's own validation: only the model files, not installed here, are refused. A made-up preset is.
  const promptErrors = async (prompt) => {
    const response = await fetch(`${args.url}/prompt`, { method: 'POST', body: JSON.stringify({ prompt }) })
    assert.equal(response.status, 400, 'the prompt names models that are not installed: it must be refused')
    const { node_errors: errors } = await response.json()
    return Object.values(errors).flatMap((e) => e.errors.map((x) => `${e.class_type}.${x.extra_info?.input_name}: ${x.details}`))
  }
  const apiPrompt = JSON.parse(readFileSync(join(dirname(workflows[0]), 'api', basename(workflows[0])), 'utf8'))
  const round1 = { SanaEmptyLatent: { preset: '1024: 1344x768 (7:4)' }, SanaTextEncoderLoader: { device: 'gpu' } }
  for (const node of Object.values(apiPrompt)) Object.assign(node.inputs, round1[node.class_type] ?? {})
  const refused = await promptErrors(apiPrompt)
  assert.ok(refused.length > 0 && refused.every((e) => /^Sana\w+Loader\.\w+_name: /.test(e)), refused.join('\n'))
  for (const node of Object.values(apiPrompt)) if (node.class_type === 'SanaEmptyLatent') node.inputs.preset = '1024: 1000x1000 (1:1)'
  assert.ok((await promptErrors(apiPrompt)).some((e) => e.startsWith('SanaEmptyLatent.preset: ')))
  log(`round-1 preset label and device "gpu" pass ComfyUI's validation (refused only: ${refused.length} missing model files)`)
  const folderPaths = await page.evaluate(() => fetch('/internal/folder_paths').then((r) => r.json()))

  let runnable = null
  for (const file of workflows) {
    const name = basename(file, '.json')
    const workflow = JSON.parse(readFileSync(file, 'utf8'))
    await loadWorkflow(workflow, `${name}.json`)
    assert.equal(await page.locator('.comfy-missing-nodes').count(), 0, `${name}: "missing node" dialog`)
    const dialogs = await page.locator('.p-dialog:visible').allInnerTexts()
    assert.deepEqual(dialogs, [], `${name}: a dialog opened on load`)
    const nodes = await nodesState()
    assert.equal(nodes.length, workflow.nodes.length, `${name}: node count`)
    for (const n of nodes) {
      assert.ok(!n.hasErrors && !n.placeholder, `${name}: node #${n.id} ${n.type} did not load as a registered node`)
      if (n.type.startsWith('Sana')) assert.equal(n.comfyClass, n.type, `${name}: node #${n.id} is not the pack's ${n.type}`)
      assert.ok(n.size[0] > 0 && n.size[1] > 0, `${name}: node #${n.id} has no size`)
    }
    // Loaders: a warning exactly when the named file is not in the installed list, naming the folder.
    for (const n of nodes.filter((n) => LOADERS.includes(n.type))) {
      const file = FILE_WIDGET[n.type]
      const installed = n.options[file].includes(n.widgets[file])
      assert.equal(n.lines.length === 0, installed, `${name}: #${n.id} ${n.type} warning for ${n.widgets[file]}`)
      if (!installed) assert.match(n.lines.join(' '), /put it in /)
      log(`  ${n.type} ${file}=${JSON.stringify(n.widgets[file])}: ${installed ? 'installed' : n.lines.join(' | ')}`)
    }
    // The info widgets are not saved and not sent: the workflow and the prompt look as without js/.
    const { saved, prompt } = await page.evaluate(async () => ({
      saved: window.app.graph.serialize().nodes.map((n) => [n.id, n.widgets_values?.length ?? 0]),
      prompt: (await window.app.graphToPrompt()).output
    }))
    for (const [id, count] of saved) {
      const original = workflow.nodes.find((n) => n.id === id)
      assert.equal(count, original.widgets_values?.length ?? 0, `${name}: node #${id} saves ${count} widget values`)
    }
    for (const [id, node] of Object.entries(prompt)) {
      assert.ok(!('sana_info' in node.inputs), `${name}: node #${id} sends its info text as an input`)
    }
    expectNoConsoleErrors(`loading ${name}`)
    await shot(name)
    log(`${name}: ${nodes.length} nodes rendered (${[...new Set(nodes.map((n) => n.type))].join(', ')})`)
    await checkLayout(name, 'first load with the "not installed" warnings', { view: true })

    // Reloaded three times by switching tabs, then dropped again as a saved file: every node keeps its size,
    // and the "not installed" toast does not come back on a tab switch (a new load, the drop, shows it).
    const sizes = await sizesOf()
    const tab = await activeTab()
    await page.evaluate(() => window.app.extensionManager.toast.removeAll?.())
    await sleep(300)
    for (let reload = 1; reload <= 3; reload++) {
      await clickTab(tab.index === 0 ? 1 : 0)
      await clickTab(tab.index)
      assert.deepEqual(await sizesOf(), sizes, `${name}: node sizes after tab switch ${reload}`)
    }
    assert.equal(await sanaToasts(), 0, `${name}: the "not installed" toast came back on a tab switch`)
    const savedFile = await page.evaluate(() => JSON.stringify(window.app.graph.serialize()))
    await dropWorkflow(savedFile, `${name}.json`)
    assert.deepEqual(await sizesOf(), sizes, `${name}: node sizes after dropping the saved workflow`)
    const missingFiles = nodes.some((n) => LOADERS.includes(n.type) && n.lines.length)
    if (missingFiles) await page.locator('.p-toast-message', { hasText: 'SANA:' }).waitFor({ timeout: 5000 })
    log(`${name}: sizes unchanged after 3 tab switches and a re-drop; toast on the drop only: ${missingFiles}`)
    expectNoConsoleErrors(`reloading ${name}`)

    const types = nodes.map((n) => n.type)
    if (!runnable && types.includes('SanaEmptyLatent') && types.includes('SanaSampler') && !types.includes('LoadImage')) {
      runnable = { name, workflow }
    }
  }
  assert.ok(runnable, 'no shipped workflow with SanaEmptyLatent and SanaSampler (text-to-image)')

  // --- The preset widget on SanaEmptyLatent, driven like a user: combo menu and number prompt.
  await loadWorkflow(runnable.workflow, `${runnable.name}.json`)
  const latentId = (await nodesState()).find((n) => n.type === 'SanaEmptyLatent').id
  const latent = async () => (await nodesState()).find((n) => n.id === latentId)
  const presetLabels = (await latent()).options.preset
  assert.equal((await latent()).widgets.preset, '1024px · 1:1 · 1024x1024', 'the preset of the default size')
  const big = presetLabels.find((l) => l.startsWith('4K · 1:1 · 4096x4096'))
  assert.ok(big, `preset labels: ${presetLabels.slice(0, 4).join(', ')}...`)

  const fresh = await page.evaluate(() => {
    const node = window.LiteGraph.createNode('SanaEmptyLatent') // as from the node library
    const values = Object.fromEntries(node.widgets.map((w) => [w.name, w.value]))
    return [values.preset, values.width, values.height, node.sanaLines()]
  })
  assert.deepEqual(fresh, ['1024px · 1:1 · 1024x1024', 1024, 1024, ['latent 32×32 · 1,024 tokens', 'native 1024 bin size ✓']])
  log(`a new SANA Empty Latent: ${JSON.stringify(fresh)}`)

  const shown = await pickFromCombo(latentId, 'preset', '16:9')
  assert.deepEqual(shown, ['1024px · 16:9 · 1344x768', '2K · 16:9 · 2688x1536', '4K · 16:9 · 5376x3072', '512px · 16:9 · 672x384'])
  let s = await latent()
  assert.deepEqual([s.widgets.preset, s.widgets.width, s.widgets.height], [shown[0], 1344, 768])
  assert.deepEqual(s.lines, ['latent 42×24 · 1,008 tokens', 'native 1024 bin size ✓'])
  log(`typed "16:9" in the preset filter: ${JSON.stringify(shown)}; Enter -> ${s.widgets.width}x${s.widgets.height}, shows ${JSON.stringify(s.lines)}`)

  await typeNumber(latentId, 'width', 1000)
  s = await latent()
  assert.deepEqual([s.widgets.preset, s.widgets.width, s.widgets.height], ['custom', 992, 768])
  assert.deepEqual(s.lines, ['latent 31×24 · 744 tokens', '1024 bin: nearest native 1152×896'])
  log(`typed width 1000 -> ${s.widgets.width}, preset "${s.widgets.preset}"; shows ${JSON.stringify(s.lines)}`)

  await pickFromCombo(latentId, 'preset', big)
  s = await latent()
  assert.deepEqual([s.widgets.width, s.widgets.height], [4096, 4096])
  assert.deepEqual(s.lines, ['latent 128×128 · 16,384 tokens', 'native 4K bin size ✓'])
  log(`preset "${big}" -> ${s.widgets.width}x${s.widgets.height}; shows ${JSON.stringify(s.lines)}`)
  await frame()
  await shot(`${runnable.name}_latent_presets`)

  // --- A loader naming a file that is not installed: the node says so, with the server's folder; a toast too.
  const missing = structuredClone(runnable.workflow)
  for (const n of missing.nodes.filter((n) => n.type === 'SanaVAELoader')) n.widgets_values[0] = 'not_installed_dc-ae.safetensors'
  await page.evaluate(() => window.app.extensionManager.toast.removeAll?.())
  await sleep(300)
  await loadWorkflow(missing, `${runnable.name}_missing_vae.json`)
  const vae = (await nodesState()).find((n) => n.type === 'SanaVAELoader')
  const vaeDir = folderPaths.vae.find((d) => basename(d) === 'vae') || folderPaths.vae[0]
  assert.deepEqual(vae.lines.slice(0, 2), ['⚠ not installed: not_installed_dc-ae.safetensors', `put it in ${vaeDir}`])
  await page.locator('.p-toast-message', { hasText: 'not_installed_dc-ae.safetensors' }).waitFor({ timeout: 5000 })
  log(`missing VAE file -> node shows ${JSON.stringify(vae.lines)}; toast shown`)
  await page.evaluate((id) => window.app.canvas.centerOnNode(window.app.graph.getNodeById(id)), vae.id)
  await frame()
  await shot(`${runnable.name}_missing_model`)
  expectNoConsoleErrors('using the widgets')

  // --- Every shipped workflow run from the page at 64x64 / 2 steps with the installed demo models (the
  // image-to-image one on an uploaded 64x64 image): stats on SanaSampler, and no overlaps after the run.
  const runErrors = []
  let runsDone = 0
  await page.exposeFunction('__sanaRunError', (e) => runErrors.push(e))
  await page.exposeFunction('__sanaRunDone', () => runsDone++)
  await page.evaluate(async () => {
    window.app.api.addEventListener('execution_error', (e) => window.__sanaRunError(JSON.stringify(e.detail).slice(0, 2000)))
    window.app.api.addEventListener('execution_success', () => window.__sanaRunDone())
    const canvas = new OffscreenCanvas(64, 64)
    const g = canvas.getContext('2d')
    g.fillStyle = '#c87828'
    g.fillRect(0, 0, 64, 64)
    const body = new FormData()
    body.append('image', await canvas.convertToBlob({ type: 'image/png' }), 'example.png')
    body.append('overwrite', 'true')
    const response = await fetch('/upload/image', { method: 'POST', body })
    if (!response.ok) throw new Error(`upload: ${response.status}`)
  })
  for (const file of workflows) {
    const name = basename(file, '.json')
    await loadWorkflow(JSON.parse(readFileSync(file, 'utf8')), `${name}.json`)
    await page.evaluate(() => {
      const set = (node, name, value) => {
        const w = node.widgets?.find((w) => w.name === name)
        if (w) w.value = value
      }
      for (const node of window.app.graph.nodes) {
        const file = node.widgets?.[0]
        if (['SanaModelLoader', 'SanaTextEncoderLoader', 'SanaVAELoader', 'SanaControlNetLoader', 'SanaLoraLoader'].includes(node.type) && !file.options.values.includes(file.value)) {
          const sprint = /sprint/i.test(file.value) // the demo models: a SANA and a Sana-Sprint DiT
          file.value = file.options.values.find((v) => /sprint/i.test(v) === sprint) ?? file.options.values[0]
        }
        if (node.type === 'SanaEmptyLatent') Object.entries({ preset: 'custom', width: 64, height: 64, batch_size: 1 }).forEach(([k, v]) => set(node, k, v))
        if (['SanaSampler', 'KSampler'].includes(node.type)) set(node, 'steps', 2)
        if (node.type === 'LoadImage') set(node, 'image', 'example.png')
      }
    })
    const before = runsDone
    await page.evaluate(() => window.app.queuePrompt(0, 1))
    const samplerStats = await page
      .waitForFunction(
        () => {
          const node = window.app.graph.nodes.find((n) => n.type === 'SanaSampler')
          if (!node) return { lines: null } // KSampler (the ControlNet workflow): no stats to wait for
          return node.sanaStats ? { lines: node.sanaLines(), id: node.id } : null
        },
        null,
        { timeout: Number(args['run-timeout']) * 1000, polling: 500 }
      )
      .then((h) => h.jsonValue())
      .catch(async (e) => {
        const nodeErrors = await page.evaluate(() => JSON.stringify(window.app.lastNodeErrors ?? null))
        throw new Error(`${name}: no sana_stats reached SanaSampler: ${runErrors.join('\n') || e.message}; node errors: ${nodeErrors}`)
      })
    assert.deepEqual(runErrors, [])
    if (samplerStats.lines) {
      assert.equal(samplerStats.lines.length, 3)
      assert.match(samplerStats.lines[0], /^[\d.]+ (ms|s) \/ step \(2 steps\)$/)
      assert.match(samplerStats.lines[1], /^[\d.]+ (ms|s) total$/)
      assert.match(samplerStats.lines[2], /^peak GPU memory/)
    }
    for (let t = 0; runsDone === before && runErrors.length === 0 && t < 240; t++) await sleep(500) // decode and save
    assert.ok(runsDone > before && runErrors.length === 0, `${name}: the run did not finish cleanly: ${runErrors.join('\n')}`)
    await sleep(500) // the last preview images arrive with execution_success
    await frame()
    log(`${name}: ran` + (samplerStats.lines ? `; SanaSampler shows ${JSON.stringify(samplerStats.lines)}` : ''))
    await checkLayout(name, 'after a run', { view: false })
    await shot(`${name}_after_run`)
    expectNoConsoleErrors(`running ${name}`)
  }

  // --- The detector above can fail: a workflow with an unknown node type does open the dialog.
  const unknown = { id: 9999, type: 'NoSuchNodeType', pos: [0, 0], size: [200, 80], flags: {}, order: 0, mode: 0, properties: {}, widgets_values: [] }
  await loadWorkflow({ ...runnable.workflow, last_node_id: 9999, nodes: [...runnable.workflow.nodes, unknown] }, 'missing-node-check.json')
  await page.locator('.comfy-missing-nodes').waitFor({ timeout: 5000 })
  log('self-check: an unknown node type opens the "missing node" dialog (so its absence above means something)')
  log(`requests to other hosts aborted: ${outside.length} (${[...new Set(outside)].join(', ') || 'none'})`)
  assert.deepEqual(layoutProblems, [], `layout: ${layoutProblems.length} problems in the shipped workflows (listed above)`)
  log('BROWSER CHECK PASSED')
} catch (error) {
  await shot('failure').catch(() => {})
  console.error(error)
  process.exitCode = 1
} finally {
  await context.close()
  rmSync(profile, { recursive: true, force: true })
}
