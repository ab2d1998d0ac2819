// <credit-usage-chart days="30">: AI spend per UTC day over the last `days`
// days (1 to 90), as an SVG bar chart; each bar names its day, cost and
// chats, and a summary gives today's spend and the total. `refresh()`
// reloads it (the page calls it after a payment); a new `days` reloads it
// too.

import { adoptStyles, formatMicros, h, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
credit-usage-chart { display: block; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
credit-usage-chart h2 { margin: 0 0 0.75rem; font-size: 1.1rem; }
.chart__status { color: var(--muted); text-align: center; margin: 1rem 0; }
.chart__svg { display: block; width: 100%; height: 8rem; background: var(--bg-soft); border-radius: 0.4rem; }
.chart__bar { fill: var(--accent); }
.chart__axis { stroke: var(--border); stroke-width: 1; }
.chart__range { display: flex; justify-content: space-between; gap: 0.5rem; margin: 0.25rem 0 0; font-size: 0.75rem; color: var(--muted); }
.chart__summary { margin: 0.5rem 0 0; font-size: 0.9rem; color: var(--muted); }
`)

const SVG = 'http://www.w3.org/2000/svg'
const WIDTH = 300
const HEIGHT = 100
const dayFormat = new Intl.DateTimeFormat('fr-FR', { day: 'numeric', month: 'short', timeZone: 'UTC' })

function svg(name, attributes = {}, ...children) {
  const element = document.createElementNS(SVG, name)
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value))
  element.append(...children)
  return element
}

class CreditUsageChartElement extends HTMLElement {
  static observedAttributes = ['days']

  connectedCallback() {
    adoptStyles(this, STYLES)
    this.connected = true
    this.refresh()
  }

  disconnectedCallback() {
    this.connected = false
  }

  /** A new number of days reloads the chart. */
  attributeChangedCallback(name, previous, value) {
    if (previous !== value && this.connected) this.refresh()
  }

  get days() {
    const days = Number(this.getAttribute('days') ?? 30)
    return Number.isInteger(days) && days >= 1 && days <= 90 ? days : 30
  }

  async refresh() {
    try {
      const report = await request(this, `/api/credits/usage/daily?days=${this.days}`)
      this.render(report.days)
    } catch (error) {
      this.dataset.state = 'error'
      this.replaceChildren(
        h('h2', {}, 'Dépenses par jour'),
        h('p', { class: 'chart__status' }, error.status === 401 ? 'Connectez-vous pour voir vos dépenses.' : `Dépenses indisponibles : ${error.message}`),
      )
    }
  }

  render(days) {
    this.dataset.state = 'ready'
    const costs = days.map((day) => BigInt(day.costMicros))
    const highest = costs.reduce((a, b) => (b > a ? b : a), 0n)
    const total = costs.reduce((a, b) => a + b, 0n)
    const slot = WIDTH / days.length
    const bars = days.map((day, index) => {
      // Bar heights are drawing, not money: integer per-mille of the highest day.
      const share = highest === 0n ? 0 : Number((BigInt(day.costMicros) * 1000n) / highest)
      const height = day.costMicros > 0 ? Math.max(1, (share * (HEIGHT - 2)) / 1000) : 0
      const label = `${dayFormat.format(new Date(`${day.date}T00:00:00Z`))} : ${formatMicros(day.costMicros, { decimals: 4, roundUp: true })} · ${day.chats} chat${day.chats > 1 ? 's' : ''}`
      return svg(
        'rect',
        {
          class: 'chart__bar',
          x: (index * slot + slot * 0.15).toFixed(2),
          y: (HEIGHT - height).toFixed(2),
          width: (slot * 0.7).toFixed(2),
          height: height.toFixed(2),
          'data-date': day.date,
          'data-cost-micros': day.costMicros,
          'data-chats': day.chats,
        },
        svg('title', {}, label),
      )
    })
    const today = days[days.length - 1]
    const chart = svg(
      'svg',
      { class: 'chart__svg', viewBox: `0 0 ${WIDTH} ${HEIGHT}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': `Dépenses par jour sur ${days.length} jours` },
      svg('line', { class: 'chart__axis', x1: 0, y1: HEIGHT - 0.5, x2: WIDTH, y2: HEIGHT - 0.5 }),
      ...bars,
    )
    const summary = h(
      'p',
      { class: 'chart__summary' },
      h('span', { class: 'chart__today', 'data-cost-micros': today?.costMicros ?? 0 }, `Aujourd'hui : ${formatMicros(today?.costMicros ?? 0, { decimals: 4, roundUp: true })}`),
      ' · ',
      h('span', { class: 'chart__total' }, `Total ${days.length} jours : ${formatMicros(total, { decimals: 4, roundUp: true })}`),
    )
    // The chart's ends and scale, so a lone bar reads as a day and an amount.
    const range = h(
      'p',
      { class: 'chart__range', 'aria-hidden': 'true' },
      h('span', {}, days.length ? dayFormat.format(new Date(`${days[0].date}T00:00:00Z`)) : ''),
      h('span', {}, highest > 0n ? `max ${formatMicros(highest, { decimals: 4, roundUp: true })} / jour` : ''),
      h('span', {}, "aujourd'hui"),
    )
    const parts = [h('h2', {}, `Dépenses par jour (${days.length} derniers jours)`), chart, range, summary]
    if (total === 0n) parts.push(h('p', { class: 'chart__status' }, 'Aucune utilisation sur la période.'))
    this.replaceChildren(...parts)
  }
}

if (!customElements.get('credit-usage-chart')) customElements.define('credit-usage-chart', CreditUsageChartElement)
