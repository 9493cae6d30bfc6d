// SANA frontend extension: resolution presets and latent size on SanaEmptyLatent, generation stats
// and the flow_shift default on SanaSampler, "model file not installed" on the loaders. Touches only
// this pack's node types.
// The logic lives in sana_logic.js (tested under Node); this file wires it to the canvas.
import { app } from '../../scripts/app.js'
import { api } from '../../scripts/api.js'
import {
  LOADER_FOLDERS,
  flowShiftText,
  latentInfoLines,
  missingModelLines,
  presetForSize,
  presetsFromOptions,
  snap32,
  statsFromOutput,
  statsLines,
  trainedSizes,
  upgradePreset,
  wrapText
} from './sana_logic.js'

const LINE_HEIGHT = 16
const FONT = '12px Arial'
const INFO_COLOR = '#9aa4b8'
const WARN_COLOR = '#ff7b5c'

// This pack's folder: ComfyUI serves js/ at /extensions/<folder>/ and names the pack's nodes'
// python_module "custom_nodes.<folder>", so a same-named node of another pack is left alone.
const PACK_FOLDER = decodeURIComponent(new URL(import.meta.url).pathname.split('/').slice(-2)[0])

function isThisPack(nodeData) {
  return typeof nodeData.python_module !== 'string' || nodeData.python_module === `custom_nodes.${PACK_FOLDER}`
}

let folderPaths = {} // {folder: [absolute dirs]} from the server, for the loaders' messages
let lastToast = null // the missing-models toast of the last workflow load
// Whether the graph being loaded is a new load (file, drop, template) rather than ComfyUI restoring one
// (tab switch, undo): it restores with its missing-models dialog off, and the toast follows it.
let freshLoad = true

function comboValues(widget) {
  const values = widget?.options?.values
  return typeof values === 'function' ? values() : values || []
}

// Height the info widget takes in its node: its lines and the 4 px LiteGraph puts under each widget.
function shownHeight(info) {
  return info.hidden ? 0 : info.computeSize()[1] + 4
}

// Re-reads a node's info lines; the node grows or shrinks by what the text needs (the user's own
// resizing kept). `ctx` measures the text: the drawing context, or the canvas's outside a draw.
function refreshInfo(node, ctx) {
  const info = node.sanaInfo
  if (!info || !ctx || node.flags?.collapsed) return
  ctx.save()
  ctx.font = FONT
  const rows = node.sanaLines().flatMap((line) => wrapText(line, node.size[0] - 20, (t) => ctx.measureText(t).width))
  ctx.restore()
  if (rows.join('\n') === info.rows.join('\n')) return
  const before = shownHeight(info)
  info.rows = rows
  info.hidden = rows.length === 0
  const after = shownHeight(info)
  if (after !== before) node.setSize([node.size[0], Math.max(node.computeSize()[1], node.size[1] + after - before)])
  node.setDirtyCanvas?.(true, true)
}

function canvasContext() {
  return app.canvas?.canvas?.getContext?.('2d') ?? null
}

// Adds a read-only text widget under a node type's widgets: `linesOf(node)` -> lines to show.
// It is a canvas widget (drawn in the node's stacking order, laid out above ComfyUI's image
// previews), never serialized (no widgets_values entry, no prompt input), hidden when there is
// nothing to say, and not clickable. `node.sanaLines()` returns what it shows.
// Sizes are computed, never accumulated: the saved size leaves the text out (it is re-added when the
// node is drawn), so reloading a workflow (tab switch, re-opening the file) gives the same size.
function addInfoWidget(nodeType, linesOf, color) {
  const { onNodeCreated, onDrawForeground, onSerialize } = nodeType.prototype
  nodeType.prototype.sanaLines = function () {
    return linesOf(this)
  }
  nodeType.prototype.onNodeCreated = function () {
    const r = onNodeCreated?.apply(this, arguments)
    this.sanaInfo = this.addCustomWidget({
      name: 'sana_info',
      type: 'sana_info',
      value: '',
      serialize: false,
      options: { serialize: false },
      disabled: true, // not clickable: the node drags from here like from its body
      hidden: true,
      rows: [],
      computeSize(width) {
        return [width, this.rows.length * LINE_HEIGHT + 4]
      },
      draw(ctx, node, width, y) {
        ctx.save()
        ctx.globalAlpha = Math.min(1, ctx.globalAlpha * 2) // undo the dimming of disabled widgets
        ctx.font = FONT
        ctx.fillStyle = color
        ctx.textAlign = 'left'
        this.rows.forEach((row, i) => ctx.fillText(row, 10, y + (i + 0.75) * LINE_HEIGHT + 2))
        ctx.restore()
      }
    })
    this.sanaInfo.serialize = false // on the concrete widget too (LiteGraph reads it there)
    return r
  }
  // Re-read the lines every frame (cheap): they follow widget edits, workflow loads, run results and
  // refreshed model lists alike.
  nodeType.prototype.onDrawForeground = function (ctx) {
    const r = onDrawForeground?.apply(this, arguments)
    refreshInfo(this, ctx)
    return r
  }
  nodeType.prototype.onSerialize = function (o) {
    const r = onSerialize?.apply(this, arguments)
    if (this.sanaInfo && Array.isArray(o.size)) o.size[1] -= shownHeight(this.sanaInfo)
    return r
  }
}

// Wraps a widget's callback: `after(value)` runs once the original callback has run.
function afterCallback(widget, after) {
  const callback = widget.callback
  widget.callback = function () {
    const r = callback?.apply(this, arguments)
    after(widget.value)
    return r
  }
}

function setupEmptyLatent(nodeType, nodeData) {
  const trained = trainedSizes(nodeData.input?.required?.preset?.[1]?.trained_sizes)
  const { onNodeCreated, onConfigure } = nodeType.prototype
  nodeType.prototype.onNodeCreated = function () {
    const r = onNodeCreated?.apply(this, arguments)
    const width = this.widgets?.find((w) => w.name === 'width')
    const height = this.widgets?.find((w) => w.name === 'height')
    const preset = this.widgets?.find((w) => w.type === 'combo' && presetsFromOptions(comboValues(w)).length)
    if (!width || !height) return r
    this.sanaWidgets = { width, height, preset }
    const node = this
    if (preset) {
      afterCallback(preset, (value) => {
        const choice = presetsFromOptions(comboValues(preset)).find((p) => p.label === value)
        if (!choice) return // "custom": keep the current size
        width.value = snap32(choice.width, width.options?.min, width.options?.max)
        height.value = snap32(choice.height, height.options?.min, height.options?.max)
        node.setDirtyCanvas?.(true, true)
      })
    }
    for (const side of [width, height]) {
      afterCallback(side, (value) => {
        side.value = snap32(value, side.options?.min, side.options?.max)
        if (preset) {
          const label = presetForSize(comboValues(preset), width.value, height.value, preset.value)
          if (label !== null) preset.value = label
        }
        node.setDirtyCanvas?.(true, true)
      })
    }
    return r
  }
  // A saved round-1 preset label shows as today's preset of that size (or custom with that size).
  nodeType.prototype.onConfigure = function () {
    const r = onConfigure?.apply(this, arguments)
    const { width, height, preset } = this.sanaWidgets || {}
    const upgrade = preset && upgradePreset(comboValues(preset), preset.value)
    if (upgrade) {
      preset.value = upgrade.preset
      width.value = upgrade.width
      height.value = upgrade.height
    }
    return r
  }
  addInfoWidget(
    nodeType,
    (node) => {
      const w = node.sanaWidgets
      return w ? latentInfoLines(trained, w.width.value, w.height.value) : []
    },
    INFO_COLOR
  )
}

function setupSampler(nodeType) {
  const { onNodeCreated, onExecuted } = nodeType.prototype
  nodeType.prototype.onNodeCreated = function () {
    const r = onNodeCreated?.apply(this, arguments)
    // flow_shift 0 reads "0 = model default" on the node (LiteGraph's number widgets draw _displayValue).
    const shift = this.widgets?.find((w) => w.name === 'flow_shift')
    const number = shift && Object.getOwnPropertyDescriptor(Object.getPrototypeOf(shift), '_displayValue')
    if (number?.get) {
      Object.defineProperty(shift, '_displayValue', {
        configurable: true,
        get() {
          return (!this.computedDisabled && flowShiftText(this.value)) || number.get.call(this)
        }
      })
    }
    return r
  }
  nodeType.prototype.onExecuted = function (output) {
    const r = onExecuted?.apply(this, arguments)
    if (output && 'sana_stats' in output) {
      this.sanaStats = statsFromOutput(output) // null when the run sampled nothing: the old stats go
      refreshInfo(this, canvasContext())
    }
    return r
  }
  addInfoWidget(nodeType, (node) => statsLines(node.sanaStats), INFO_COLOR)
}

// The loader's file widget: its first combo (the file list comes first in every SANA loader).
function modelWidget(node) {
  return node.widgets?.find((w) => w.type === 'combo')
}

// [] unless `node` is one of this pack's loaders naming a file that is not installed.
function missingLines(node) {
  const widget = modelWidget(node)
  const folders = node.sanaModelFolders // set on this pack's loader types only
  if (!widget || !folders || node.inputs?.some((i) => i.widget?.name === widget.name && i.link != null)) return []
  return missingModelLines(widget.value, comboValues(widget), folders, folderPaths)
}

function setupLoader(nodeType, name) {
  nodeType.prototype.sanaModelFolders = LOADER_FOLDERS[name]
  addInfoWidget(nodeType, missingLines, WARN_COLOR)
  // A missing file also outlines the node, so it stands out even where a neighbour hides the text.
  const { onDrawForeground } = nodeType.prototype
  nodeType.prototype.onDrawForeground = function (ctx) {
    const r = onDrawForeground?.apply(this, arguments)
    if (!this.flags?.collapsed && missingLines(this).length) {
      const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30
      ctx.save()
      ctx.strokeStyle = WARN_COLOR
      ctx.lineWidth = 2
      ctx.beginPath()
      if (ctx.roundRect) ctx.roundRect(-3, -title - 3, this.size[0] + 6, this.size[1] + title + 6, 10)
      else ctx.rect(-3, -title - 3, this.size[0] + 6, this.size[1] + title + 6)
      ctx.stroke()
      ctx.restore()
    }
    return r
  }
}

app.registerExtension({
  name: 'SANA.frontend',

  async setup() {
    const loadGraphData = app.loadGraphData
    app.loadGraphData = function (graphData, clean, restoreView, workflow, options) {
      freshLoad = options?.showMissingModelsDialog !== false
      return loadGraphData.apply(this, arguments)
    }
    try {
      if (typeof api.getFolderPaths === 'function') folderPaths = (await api.getFolderPaths()) || {}
      else {
        const response = await fetch(`${api.api_base ?? ''}/internal/folder_paths`) // frontends before getFolderPaths
        if (response.ok) folderPaths = await response.json()
      }
    } catch {
      folderPaths = {} // messages then name the folder as models/<folder>
    }
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isThisPack(nodeData)) return
    if (nodeData.name === 'SanaEmptyLatent') setupEmptyLatent(nodeType, nodeData)
    else if (nodeData.name === 'SanaSampler') setupSampler(nodeType)
    else if (Object.hasOwn(LOADER_FOLDERS, nodeData.name)) setupLoader(nodeType, nodeData.name)
  },

  // After a workflow loads: every info line sized (drawn or not, so the layout is final at once), and,
  // on a new load only (not a tab switch or undo), one toast listing the loaders whose files are missing.
  async afterConfigureGraph() {
    const ctx = canvasContext()
    for (const node of app.graph?.nodes || []) refreshInfo(node, ctx)
    const toast = app.extensionManager?.toast
    if (lastToast) toast?.remove?.(lastToast)
    lastToast = null
    const missing = (app.graph?.nodes || []).filter((node) => missingLines(node).length)
    if (!freshLoad || !missing.length || !toast) return
    const detail = missing.map((node) => {
      const [what, where] = missingLines(node)
      return `${node.title}: ${what.replace('⚠ ', '')}; ${where}`
    })
    lastToast = {
      severity: 'warn',
      summary: `SANA: ${missing.length === 1 ? 'a model file is' : `${missing.length} model files are`} not installed`,
      detail: `${detail.join('\n')}\nAfter adding them, press R to refresh the lists.`,
      life: 12000
    }
    toast.add(lastToast)
  }
})
