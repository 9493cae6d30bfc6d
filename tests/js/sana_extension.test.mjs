// The extension wiring (js/sana.js) against a stand-in for ComfyUI's frontend: it registers once,
// patches only SANA node types, and its widget callbacks, onExecuted and drawing do what the UI shows.
// The real frontend is exercised by tests/e2e/test_browser.py.
import assert from 'node:assert/strict'
import { copyFileSync, mkdirSync, mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'
import { before, test } from 'node:test'
import { fileURLToPath, pathToFileURL } from 'node:url'

const JS = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'js')

// ComfyUI serves the pack's js/ at /extensions/<pack>/ and the app at /scripts/app.js.
const STUB_APP = `
export const app = globalThis.__sanaTest.app
`
const STUB_API = `
export const api = globalThis.__sanaTest.api
`

const registered = []
const loadedGraphs = [] // the options app.loadGraphData was called with
const toasts = []
const removedToasts = []
const fetched = []
const graphNodes = []
globalThis.__sanaTest = {
  app: {
    registerExtension: (extension) => registered.push(extension),
    loadGraphData: async (graphData, clean, restoreView, workflow, options) => loadedGraphs.push(options),
    graph: { nodes: graphNodes },
    extensionManager: { toast: { add: (message) => toasts.push(message), remove: (message) => removedToasts.push(message) } }
  },
  api: {
    getFolderPaths: async () => {
      fetched.push('getFolderPaths')
      return { vae: ['/srv/ComfyUI/models/vae'], text_encoders: ['/srv/ComfyUI/models/text_encoders'] }
    }
  }
}

class FakeNode {
  constructor(comfyClass, widgets) {
    this.comfyClass = comfyClass
    this.title = comfyClass
    this.id = graphNodes.length + 1
    this.widgets = widgets
    this.size = [240, 100]
    this.flags = {}
    this.onNodeCreated?.()
    this.size = this.computeSize() // a new node starts at its computed size
  }
  // LiteGraph's: the widgets' heights (20 px each, or their own computeSize) + 4 px each, hidden ones left out.
  computeSize() {
    const visible = this.widgets.filter((w) => !w.hidden)
    return [240, 30 + visible.reduce((h, w) => h + (w.computeSize ? w.computeSize(240)[1] : 20) + 4, 0)]
  }
  serialize() {
    const o = { size: [...this.size], widgets_values: this.widgets.filter((w) => w.serialize !== false).map((w) => w.value) }
    this.onSerialize?.(o)
    return o
  }
  // What LiteGraph does when a workflow is loaded: size and widget values from the file, then onConfigure.
  configure(o) {
    this.size = [...o.size]
    this.widgets.filter((w) => w.serialize !== false).forEach((w, i) => (w.value = o.widgets_values[i]))
    this.onConfigure?.(o)
  }
  setSize(size) {
    this.size = size
  }
  setDirtyCanvas() {}
  addCustomWidget(widget) {
    this.widgets.push(widget)
    return widget
  }
}

function nodeType(name, input) {
  const type = class extends FakeNode {}
  registered[0].beforeRegisterNodeDef(type, { name, input })
  return type
}

function intWidget(name, value) {
  // The frontend's INT widget callback rounds to its step; the pack's comes after it.
  return { name, type: 'number', value, options: { min: 64, max: 8192, step2: 32 }, callback(v) { this.value = Math.round(v) } }
}

function combo(name, value, values) {
  return { name, type: 'combo', value, options: { values } }
}

function userSets(widget, value) {
  widget.value = value
  widget.callback?.call(widget, value)
}

function draw(node) {
  const texts = []
  const ctx = {
    save() {},
    restore() {},
    beginPath() {},
    roundRect() {},
    stroke: () => texts.push('<outline>'),
    measureText: (t) => ({ width: t.length * 6 }),
    fillText: (t) => texts.push(t)
  }
  node.onDrawForeground(ctx) // updates the info widget
  const info = node.widgets.find((w) => w.name === 'sana_info')
  if (info && !info.hidden) info.draw(ctx, node, node.size[0], 0)
  return texts
}

const PRESETS = ['custom', '1024px · 1:1 · 1024x1024', '1024px · 9:16 · 768x1344', '4K · 1:1 · 4096x4096', '4K · 9:16 · 3072x5376']
// SanaEmptyLatent's definition as /object_info sends it: the preset list and every trained size.
const LATENT_INPUT = {
  required: {
    preset: [PRESETS, { trained_sizes: { 1024: [[1024, 1024], [768, 1344], [1152, 896], [960, 1024]], 4096: [[4096, 4096], [3072, 5376]] } }]
  }
}

before(async () => {
  const root = mkdtempSync(join(tmpdir(), 'sana-ext-'))
  mkdirSync(join(root, 'scripts'))
  mkdirSync(join(root, 'extensions', 'sana'), { recursive: true })
  writeFileSync(join(root, 'package.json'), '{"type": "module"}')
  writeFileSync(join(root, 'scripts', 'app.js'), STUB_APP)
  writeFileSync(join(root, 'scripts', 'api.js'), STUB_API)
  for (const file of ['sana.js', 'sana_logic.js']) copyFileSync(join(JS, file), join(root, 'extensions', 'sana', file))
  await import(pathToFileURL(join(root, 'extensions', 'sana', 'sana.js')).href)
  await registered[0].setup()
})

test('registers one extension through app.registerExtension and reads the model folders', () => {
  assert.equal(registered.length, 1)
  assert.equal(typeof registered[0].name, 'string')
  assert.deepEqual(fetched, ['getFolderPaths'])
})

test("leaves other packs' node types untouched", () => {
  const others = [
    { name: 'EmptyLatentImage', python_module: 'nodes' },
    { name: 'KSampler', python_module: 'nodes' },
    { name: 'VAELoader', python_module: 'nodes' },
    { name: 'toString' },
    { name: 'constructor' },
    // Another pack's node that happens to share a name with ours: its module is not this pack's folder.
    { name: 'SanaSampler', python_module: 'custom_nodes.ComfyUI_ExtraModels' },
    { name: 'SanaVAELoader', python_module: 'custom_nodes.some-other-sana-pack' }
  ]
  for (const nodeData of others) {
    const type = class extends FakeNode {}
    const before = Object.getOwnPropertyNames(type.prototype)
    registered[0].beforeRegisterNodeDef(type, nodeData)
    assert.deepEqual(Object.getOwnPropertyNames(type.prototype), before, JSON.stringify(nodeData))
  }
  // The pack's own nodes, as ComfyUI describes them (custom_nodes.<the folder js/ is served from>).
  const ours = class extends FakeNode {}
  registered[0].beforeRegisterNodeDef(ours, { name: 'SanaSampler', python_module: 'custom_nodes.sana' })
  assert.ok(Object.hasOwn(ours.prototype, 'onExecuted'))
})

test('SanaEmptyLatent: a preset sets width and height; hand edits snap to 32 and re-select the preset', () => {
  const Latent = nodeType('SanaEmptyLatent', LATENT_INPUT)
  const width = intWidget('width', 1024)
  const height = intWidget('height', 1024)
  const preset = combo('preset', '1024px · 1:1 · 1024x1024', PRESETS)
  const node = new Latent('SanaEmptyLatent', [width, height, preset, intWidget('batch_size', 1)])

  userSets(preset, '4K · 9:16 · 3072x5376')
  assert.deepEqual([width.value, height.value], [3072, 5376])
  assert.deepEqual(node.sanaLines(), ['latent 96×168 · 16,128 tokens', 'native 4K bin size ✓'])

  userSets(preset, 'custom') // size-less option: keep the size
  assert.deepEqual([width.value, height.value], [3072, 5376])

  userSets(width, 1000)
  assert.equal(width.value, 992)
  userSets(width, 770)
  userSets(height, 1350)
  assert.deepEqual([width.value, height.value], [768, 1344])
  assert.equal(preset.value, '1024px · 9:16 · 768x1344')
  userSets(height, 1300)
  assert.equal(height.value, 1312)
  assert.equal(preset.value, 'custom')

  const texts = draw(node)
  assert.deepEqual(texts, ['latent 24×41 · 984 tokens', '1024 bin: nearest native 768×1344'])
  assert.equal(node.size[1], 30 + 4 * 24 + (2 * 16 + 4) + 4) // grew to fit two lines
  userSets(width, 960)
  userSets(height, 1024)
  assert.deepEqual(draw(node), ['latent 30×32 · 960 tokens', 'native 1024 bin size ✓']) // a trained size no preset names
  const info = node.widgets.find((w) => w.name === 'sana_info')
  assert.equal(node.widgets.at(-1), info) // after the node's own widgets: widgets_values unchanged
  assert.ok(info.serialize === false && info.options.serialize === false) // not saved, not sent to the server
  assert.equal(info.hidden, false)
})

test('SanaSampler shows time per step, total time and peak GPU memory from its UI output', () => {
  const Sampler = nodeType('SanaSampler')
  const seen = []
  const Chained = class extends FakeNode {
    onExecuted(output) {
      seen.push(output) // another extension's handler on the same type keeps running
    }
  }
  registered[0].beforeRegisterNodeDef(Chained, { name: 'SanaSampler' })
  const chained = new Chained('SanaSampler', [])
  chained.onExecuted({ sana_stats: [{ seconds_per_step: 0.05, total_seconds: 1, peak_gpu_memory_gib: 3.5 }] })
  assert.equal(seen.length, 1)

  const node = new Sampler('SanaSampler', [])
  assert.deepEqual(draw(node), [])
  assert.equal(node.widgets.find((w) => w.name === 'sana_info').hidden, true) // nothing to show: takes no room
  node.onExecuted({ images: [] })
  assert.deepEqual(node.sanaLines(), [])
  node.onExecuted({ sana_stats: [{ seconds_per_step: 0.25, total_seconds: 5.1, peak_gpu_memory_gib: 9.87 }] })
  assert.deepEqual(draw(node), ['250 ms / step', '5.10 s total', 'peak GPU memory 9.87 GiB'])
  assert.equal(node.size[1], 30 + (3 * 16 + 4) + 4)
  node.onExecuted({ sana_stats: [] }) // a run that sampled nothing (denoise 0): the old stats go
  assert.deepEqual(draw(node), [])
  assert.equal(node.size[1], 30) // shrank back
})

test('sizes are computed, not accumulated: saving and reloading a node three times keeps its size', () => {
  const Vae = nodeType('SanaVAELoader')
  const Sampler = nodeType('SanaSampler')
  const make = () => ({
    vae: new Vae('SanaVAELoader', [combo('vae_name', 'not_installed.safetensors', ['demo_vae.safetensors'])]),
    sampler: new Sampler('SanaSampler', [])
  })
  const first = make()
  first.sampler.onExecuted({ sana_stats: [{ seconds_per_step: 0.25, total_seconds: 5.1, peak_gpu_memory_gib: 9.87 }] })
  first.vae.size[0] = 400 // the user widens it (one line less of wrapped text is fine either way)
  first.vae.size[1] += 30 // and makes it taller than it needs
  draw(first.vae)
  draw(first.sampler)
  const shown = { vae: [...first.vae.size], sampler: [...first.sampler.size] }
  let saved = { vae: first.vae.serialize(), sampler: first.sampler.serialize() }
  assert.equal(saved.sampler.size[1], 30) // the stats are not part of the saved size
  for (let reload = 0; reload < 3; reload++) {
    const next = make()
    next.vae.configure(saved.vae)
    next.sampler.configure(saved.sampler)
    draw(next.vae)
    draw(next.sampler)
    assert.deepEqual(next.vae.size, shown.vae, `reload ${reload + 1}: the loader keeps its size`)
    assert.deepEqual(next.sampler.size, [240, 30], `reload ${reload + 1}: no stats after a reload, no room for them`)
    saved = { vae: next.vae.serialize(), sampler: next.sampler.serialize() }
  }
})

test('a round-1 preset label loads as the preset of its size, or custom with that size', () => {
  const Latent = nodeType('SanaEmptyLatent', LATENT_INPUT)
  const widgets = () => [combo('preset', 'custom', PRESETS), intWidget('width', 1024), intWidget('height', 1024), intWidget('batch_size', 1)]
  const values = (node) => node.widgets.filter((w) => w.serialize !== false).map((w) => w.value)
  const node = new Latent('SanaEmptyLatent', widgets())
  node.configure({ size: [240, 150], widgets_values: ['1024: 768x1344 (4:7)', 1024, 1024, 2] })
  assert.deepEqual(values(node), ['1024px · 9:16 · 768x1344', 768, 1344, 2])
  const other = new Latent('SanaEmptyLatent', widgets())
  other.configure({ size: [240, 150], widgets_values: ['1024: 960x1024 (15:16)', 64, 64, 1] })
  assert.deepEqual(values(other), ['custom', 960, 1024, 1]) // what the round-1 preset made
  const today = new Latent('SanaEmptyLatent', widgets())
  today.configure({ size: [240, 150], widgets_values: ['4K · 1:1 · 4096x4096', 4096, 4096, 1] })
  assert.deepEqual(values(today), ['4K · 1:1 · 4096x4096', 4096, 4096, 1])
})

test("SanaSampler's flow_shift reads '0 = model default' at 0, its number otherwise", () => {
  const Sampler = nodeType('SanaSampler')
  class NumberWidget {
    name = 'flow_shift'
    type = 'number'
    value = 0
    get _displayValue() {
      return Number(this.value).toFixed(3)
    }
  }
  const shift = new NumberWidget()
  new Sampler('SanaSampler', [shift])
  assert.equal(shift._displayValue, '0 = model default')
  shift.value = 3
  assert.equal(shift._displayValue, '3.000')
  assert.equal(new NumberWidget()._displayValue, '0.000') // other nodes' number widgets are untouched
})

test('loaders say when the named model file is not installed, with the folder, before Queue', async () => {
  const Vae = nodeType('SanaVAELoader')
  const file = combo('vae_name', 'sana_dcae_f32c32.safetensors', ['demo_vae.safetensors'])
  const node = new Vae('SanaVAELoader', [file])
  graphNodes.push(node)
  assert.deepEqual(node.sanaLines(), [
    '⚠ not installed: sana_dcae_f32c32.safetensors',
    'put it in /srv/ComfyUI/models/vae'
  ])
  const drawn = draw(node)
  assert.ok(drawn.includes('<outline>') && drawn.includes('put it in /srv/ComfyUI/models/vae'), drawn)

  // Another pack's node of the same name (its type was not patched) is not ours to report.
  const Foreign = class extends FakeNode {}
  registered[0].beforeRegisterNodeDef(Foreign, { name: 'SanaVAELoader', python_module: 'custom_nodes.other' })
  graphNodes.push(new Foreign('SanaVAELoader', [combo('vae_name', 'foreign.safetensors', [])]))

  await registered[0].afterConfigureGraph()
  assert.equal(toasts.length, 1)
  assert.equal(toasts[0].summary, 'SANA: a model file is not installed')
  assert.doesNotMatch(toasts[0].detail, /foreign/)
  assert.match(toasts[0].detail, /sana_dcae_f32c32\.safetensors; put it in \/srv\/ComfyUI\/models\/vae/)

  userSets(file, 'demo_vae.safetensors')
  assert.deepEqual(node.sanaLines(), [])
  assert.deepEqual(draw(node), [])
  assert.equal(node.size[1], 30 + 24) // shrank back
  await registered[0].afterConfigureGraph()
  assert.equal(toasts.length, 1) // nothing missing: no new toast, and the old one is taken down
  assert.deepEqual(removedToasts, [toasts[0]])
})

test('the missing-model toast comes once per workflow load, not on a tab switch or undo', async () => {
  const app = globalThis.__sanaTest.app
  const Model = nodeType('SanaModelLoader')
  graphNodes.length = 0
  graphNodes.push(new Model('SanaModelLoader', [combo('model_name', 'Sana_1600M_1024px_BF16.pth', [])]))
  const before = toasts.length
  await app.loadGraphData({ nodes: [] }, true, true, 'sana.json') // a file opened or dropped
  await registered[0].afterConfigureGraph()
  assert.equal(toasts.length, before + 1)
  // ComfyUI switching tabs (or undoing) reloads the graph with its missing-models dialog off.
  await app.loadGraphData({ nodes: [] }, true, true, {}, { showMissingModelsDialog: false, showMissingNodesDialog: false })
  await registered[0].afterConfigureGraph()
  assert.equal(toasts.length, before + 1)
  assert.equal(loadedGraphs.length, 2) // ComfyUI's own loadGraphData still ran both times
  await app.loadGraphData({ nodes: [] }, true, true, 'sana.json') // dropped again: a new load
  await registered[0].afterConfigureGraph()
  assert.equal(toasts.length, before + 2)
})
