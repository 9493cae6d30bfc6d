// SANA frontend extension: resolution presets and latent size on SanaEmptyLatent, generation stats
// on SanaSampler, "model file not installed" on the loaders. Touches only this pack's node types.
// The logic lives in sana_logic.js (tested under Node); this file wires it to the canvas.
import { app } from '../../scripts/app.js'
import { api } from '../../scripts/api.js'
import {
  LOADER_FOLDERS,
  latentInfoLines,
  missingModelLines,
  presetForSize,
  presetsFromOptions,
  snap32,
  statsFromOutput,
  statsLines,
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

function comboValues(widget) {
  const values = widget?.options?.values
  return typeof values === 'function' ? values() : values || []
}

// Adds a read-only text widget under a node type's widgets: `linesOf(node)` -> lines to show.
// It is a canvas widget (drawn in the node's stacking order, laid out above ComfyUI's image
// previews), never serialized (no widgets_values entry, no prompt input), hidden when there is
// nothing to say, and not clickable. `node.sanaLines()` returns what it shows.
function addInfoWidget(nodeType, linesOf, color) {
  const { onNodeCreated, onDrawForeground } = nodeType.prototype
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
  // refreshed model lists alike. The node grows or shrinks by what the text needs.
  nodeType.prototype.onDrawForeground = function (ctx) {
    const r = onDrawForeground?.apply(this, arguments)
    const info = this.sanaInfo
    if (!info || this.flags?.collapsed) return r
    ctx.save()
    ctx.font = FONT
    const rows = linesOf(this).flatMap((line) => wrapText(line, this.size[0] - 20, (t) => ctx.measureText(t).width))
    ctx.restore()
    if (rows.join('\n') !== info.rows.join('\n')) {
      const before = info.hidden ? 0 : info.computeSize(this.size[0])[1] + 4
      info.rows = rows
      info.hidden = rows.length === 0
      const after = info.hidden ? 0 : info.computeSize(this.size[0])[1] + 4
      if (after !== before) this.setSize([this.size[0], Math.max(this.computeSize()[1], this.size[1] + after - before)])
      this.setDirtyCanvas?.(true, true)
    }
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

function setupEmptyLatent(nodeType) {
  const { onNodeCreated } = nodeType.prototype
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
  addInfoWidget(
    nodeType,
    (node) => {
      const w = node.sanaWidgets
      if (!w) return []
      const presets = w.preset ? presetsFromOptions(comboValues(w.preset)) : []
      return latentInfoLines(presets, w.width.value, w.height.value)
    },
    INFO_COLOR
  )
}

function setupSampler(nodeType) {
  const { onExecuted } = nodeType.prototype
  nodeType.prototype.onExecuted = function (output) {
    const r = onExecuted?.apply(this, arguments)
    const stats = statsFromOutput(output)
    if (stats) {
      this.sanaStats = stats
      this.setDirtyCanvas?.(true, true)
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
    if (nodeData.name === 'SanaEmptyLatent') setupEmptyLatent(nodeType)
    else if (nodeData.name === 'SanaSampler') setupSampler(nodeType)
    else if (Object.hasOwn(LOADER_FOLDERS, nodeData.name)) setupLoader(nodeType, nodeData.name)
  },

  // After a workflow loads: one toast listing the SANA loaders whose files are not installed.
  async afterConfigureGraph() {
    const toast = app.extensionManager?.toast
    if (lastToast) toast?.remove?.(lastToast)
    lastToast = null
    const missing = (app.graph?.nodes || []).filter((node) => missingLines(node).length)
    if (!missing.length || !toast) return
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
