// <credit-history page-size="10">: tabs "Transactions" and "Utilisation",
// newest first, "Charger plus" follows the API's cursors. Each transaction
// shows its label, its badge, its signed amount and when it happened (and a
// top-up its "Facture" link, Stripe's hosted invoice); each usage its model,
// its tokens and its cost. `refresh()` reloads both tabs (the page calls
// it after a payment); a new `page-size` reloads them too.

import { adoptStyles, formatMicros, h, relativeDate, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
credit-history { display: block; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
credit-history h2 { margin: 0 0 0.75rem; font-size: 1.1rem; }
.history__tabs { display: grid; grid-template-columns: 1fr 1fr; gap: 0.25rem; background: var(--bg-soft); padding: 0.25rem; border-radius: 0.5rem; }
.history__tabs [role="tab"] { border: none; background: transparent; }
.history__tabs [aria-selected="true"] { background: #fff; box-shadow: 0 1px 2px rgb(0 0 0 / 0.12); font-weight: 600; }
.history__list { list-style: none; margin: 0.75rem 0 0; padding: 0; }
.history__row { display: flex; justify-content: space-between; gap: 0.75rem; padding: 0.5rem 0; border-bottom: 1px solid var(--border); }
.history__row:last-child { border-bottom: none; }
.history__main { min-width: 0; }
.history__main p, .history__side p { margin: 0; }
.history__label { font-weight: 500; overflow-wrap: anywhere; }
.history__date, .history__tokens { font-size: 0.8rem; color: var(--muted); }
.history__side { text-align: right; flex-shrink: 0; }
.history__amount.is-credit { color: var(--credit); font-weight: 600; }
.history__amount.is-debit { color: var(--debit); font-weight: 600; }
.history__invoice { display: block; font-size: 0.8rem; margin-top: 0.25rem; }
.history__badge { display: inline-block; font-size: 0.75rem; border: 1px solid var(--border); border-radius: 1rem; padding: 0 0.5rem; }
.history__status { color: var(--muted); text-align: center; margin: 1rem 0; }
.history__more { display: block; margin: 0.75rem auto 0; }
`)

const BADGES = {
  TOP_UP: 'Recharge',
  SIGNUP_BONUS: 'Bonus',
  PROMO_BONUS: 'Promo',
  REFUND: 'Remboursement',
  DISPUTE: 'Litige',
  ADJUSTMENT: 'Ajustement',
  EXPIRED: 'Expiration',
}

const TABS = [
  { id: 'transactions', label: 'Transactions', path: '/api/credits/transactions', empty: 'Aucune transaction' },
  { id: 'usages', label: 'Utilisation', path: '/api/credits/usages', empty: 'Aucune utilisation' },
]

const tokens = new Intl.NumberFormat('fr-FR')

function transactionRow(item) {
  const credit = item.direction === 'CREDIT'
  const amount = formatMicros(credit ? item.amountMicros : -item.amountMicros, { signed: true })
  return h(
    'li',
    { class: 'history__row', 'data-type': item.type },
    h(
      'div',
      { class: 'history__main' },
      h('p', { class: 'history__label' }, item.description || BADGES[item.type] || item.type),
      h('p', { class: 'history__date' }, h('time', { datetime: item.createdAt }, relativeDate(item.createdAt))),
    ),
    h(
      'div',
      { class: 'history__side' },
      h('p', { class: `history__amount ${credit ? 'is-credit' : 'is-debit'}` }, amount),
      h('span', { class: 'history__badge' }, BADGES[item.type] ?? item.type),
      item.invoiceUrl
        ? h(
            'a',
            { class: 'history__invoice', href: item.invoiceUrl, target: '_blank', rel: 'noopener noreferrer' },
            'Facture',
          )
        : null,
    ),
  )
}

function usageRow(item) {
  return h(
    'li',
    { class: 'history__row', 'data-model': item.model },
    h(
      'div',
      { class: 'history__main' },
      h('p', { class: 'history__label' }, item.model),
      h('p', { class: 'history__tokens' }, `${tokens.format(item.inputTokens)} jetons en entrée · ${tokens.format(item.outputTokens)} en sortie`),
    ),
    h(
      'div',
      { class: 'history__side' },
      h('p', { class: 'history__amount is-debit' }, formatMicros(-item.costMicros, { decimals: 4, roundUp: true })),
      h('p', { class: 'history__date' }, h('time', { datetime: item.createdAt }, relativeDate(item.createdAt))),
    ),
  )
}

class CreditHistoryElement extends HTMLElement {
  static observedAttributes = ['page-size']

  connectedCallback() {
    adoptStyles(this, STYLES)
    if (!this.panels) this.build()
    this.refresh()
  }

  /** A new page size reloads the first page of both tabs. */
  attributeChangedCallback(name, previous, value) {
    if (previous !== value && this.panels && this.isConnected) this.refresh()
  }

  get pageSize() {
    const size = Number(this.getAttribute('page-size') ?? 10)
    return Number.isInteger(size) && size >= 1 && size <= 100 ? size : 10
  }

  build() {
    this.tabs = []
    this.panels = new Map()
    const list = h('div', { class: 'history__tabs', role: 'tablist', 'aria-label': 'Historique' })
    for (const [index, tab] of TABS.entries()) {
      const button = h(
        'button',
        { type: 'button', role: 'tab', id: `history-tab-${tab.id}`, 'aria-controls': `history-panel-${tab.id}`, 'aria-selected': index === 0 ? 'true' : 'false', tabindex: index === 0 ? '0' : '-1' },
        tab.label,
      )
      button.addEventListener('click', () => this.select(index))
      button.addEventListener('keydown', (event) => {
        if (event.key === 'ArrowRight' || event.key === 'ArrowLeft') {
          const next = (index + (event.key === 'ArrowRight' ? 1 : TABS.length - 1)) % TABS.length
          this.select(next)
          this.tabs[next].focus()
        }
      })
      this.tabs.push(button)
      list.append(button)
      const items = h('ul', { class: 'history__list' })
      const more = h('button', { type: 'button', class: 'history__more', hidden: true }, 'Charger plus')
      more.addEventListener('click', () => this.load(tab, false))
      const status = h('p', { class: 'history__status' })
      const panel = h(
        'div',
        { role: 'tabpanel', id: `history-panel-${tab.id}`, 'aria-labelledby': `history-tab-${tab.id}`, 'data-tab': tab.id, hidden: index !== 0 },
        status,
        items,
        more,
      )
      this.panels.set(tab.id, { panel, items, more, status, cursor: null })
    }
    this.replaceChildren(h('h2', {}, 'Historique'), list, ...[...this.panels.values()].map((p) => p.panel))
  }

  select(index) {
    for (const [i, button] of this.tabs.entries()) {
      button.setAttribute('aria-selected', i === index ? 'true' : 'false')
      button.tabIndex = i === index ? 0 : -1
    }
    for (const [i, tab] of TABS.entries()) this.panels.get(tab.id).panel.hidden = i !== index
  }

  /** Reloads the first page of both tabs. */
  async refresh() {
    await Promise.all(TABS.map((tab) => this.load(tab, true)))
  }

  async load(tab, first) {
    const state = this.panels.get(tab.id)
    const params = new URLSearchParams({ limit: String(this.pageSize) })
    if (!first && state.cursor) params.set('cursor', state.cursor)
    state.more.disabled = true
    try {
      const page = await request(this, `${tab.path}?${params}`)
      const rows = page.items.map(tab.id === 'transactions' ? transactionRow : usageRow)
      if (first) state.items.replaceChildren(...rows)
      else state.items.append(...rows)
      state.cursor = page.nextCursor ?? null
      state.more.hidden = !state.cursor
      const empty = state.items.children.length === 0
      state.status.textContent = empty ? tab.empty : ''
      state.status.hidden = !empty
    } catch (error) {
      state.status.hidden = false
      state.status.textContent = error.status === 401 ? 'Connectez-vous pour voir votre historique.' : `Historique indisponible : ${error.message}`
    } finally {
      state.more.disabled = false
    }
  }
}

if (!customElements.get('credit-history')) customElements.define('credit-history', CreditHistoryElement)
