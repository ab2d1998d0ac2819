// <admin-platform>: the platform at a glance (GET /admin/platform): the
// database, the journal writers' queue and stall state, settlements still
// pending, events and emails waiting or given up; what every account did in
// the last hour (chats and their cost, top-ups, refunds); and reconcile on
// demand (GET /admin/reconcile), with its report.

import { adoptStyles, formatMicros, h, request, stylesheet } from '../credits/credits-api.js'

const STYLES = stylesheet(`
admin-platform { display: block; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
admin-platform h2 { margin: 0 0 0.75rem; font-size: 1.1rem; }
admin-platform h3 { margin: 0 0 0.5rem; font-size: 0.95rem; }
.platform__numbers { display: grid; grid-template-columns: repeat(auto-fill, minmax(12rem, 1fr)); gap: 0.5rem; margin: 0 0 0.75rem; }
.platform__numbers div { background: var(--bg-soft); border-radius: 0.4rem; padding: 0.5rem; }
.platform__numbers dt { color: var(--muted); font-size: 0.85rem; }
.platform__numbers dd { margin: 0; font-weight: 600; }
.platform__numbers [data-alarm] dd { color: var(--danger); }
.platform__actions { display: flex; gap: 0.5rem; flex-wrap: wrap; }
.platform__report { margin: 0.75rem 0 0; }
.platform__report[data-clean="false"] { color: var(--danger); }
.platform__problems { white-space: pre-wrap; overflow-wrap: anywhere; font-size: 0.85rem; background: var(--bg-soft); padding: 0.5rem; border-radius: 0.4rem; }
`)

const NUMBERS = [
  ['databaseUp', 'Base de données', (v) => (v ? 'joignable' : 'injoignable'), (v) => !v],
  ['journalQueueDepth', "File du journal (cette instance)", String, () => false],
  ['journalStalled', 'Journal', (v) => (v ? 'bloqué' : 'avance'), (v) => v],
  ['pendingSettlements', 'Règlements en attente', String, () => false],
  ['residentAccounts', 'Comptes en mémoire', String, () => false],
  ['eventsPending', 'Événements en attente', String, () => false],
  ['eventsFailed', 'Événements en échec', String, (v) => v > 0],
  ['emailsPending', 'E-mails en attente', String, () => false],
  ['emailsFailed', 'E-mails en échec', String, (v) => v > 0],
]

// The last hour, every instance (from the committed journal).
const LAST_HOUR = [
  ['chats', 'Chats', (a) => String(a.chats)],
  ['spend', 'Dépensé', (a) => formatMicros(a.spendMicros)],
  ['topUps', 'Recharges', (a) => `${a.topUps} · ${formatMicros(a.topUpMicros)}`],
  ['refunds', 'Remboursements', (a) => `${a.refunds} · ${formatMicros(a.refundMicros)}`],
]

class AdminPlatformElement extends HTMLElement {
  connectedCallback() {
    adoptStyles(this, STYLES)
    if (this.numbers) return
    this.numbers = h('dl', { class: 'platform__numbers' })
    this.lastHour = h('dl', { class: 'platform__numbers platform__last-hour' })
    this.report = h('div', { class: 'platform__report', role: 'status' })
    const refresh = h('button', { type: 'button', class: 'platform__refresh' }, 'Actualiser')
    const reconcile = h('button', { type: 'button', class: 'platform__reconcile' }, 'Lancer la réconciliation')
    refresh.addEventListener('click', () => this.load())
    reconcile.addEventListener('click', () => this.reconcile(reconcile))
    this.replaceChildren(h('h2', {}, 'Plateforme'), this.numbers, h('h3', {}, 'Dernière heure'), this.lastHour, h('div', { class: 'platform__actions' }, refresh, reconcile), this.report)
    this.load()
  }

  async load() {
    try {
      const platform = await request(this, '/admin/platform')
      this.numbers.replaceChildren(
        ...NUMBERS.map(([key, label, text, alarm]) =>
          h('div', { 'data-key': key, 'data-alarm': alarm(platform[key]) || null }, h('dt', {}, label), h('dd', {}, text(platform[key]))),
        ),
      )
      this.lastHour.replaceChildren(
        ...LAST_HOUR.map(([key, label, text]) =>
          h('div', { 'data-key': key }, h('dt', {}, label), h('dd', {}, text(platform.lastHour))),
        ),
      )
    } catch (error) {
      this.lastHour.replaceChildren()
      this.numbers.replaceChildren(h('p', { role: 'alert' }, `État indisponible : ${error.message}`))
    }
  }

  async reconcile(button) {
    button.disabled = true
    this.report.textContent = 'Réconciliation en cours…'
    try {
      const report = await request(this, '/admin/reconcile')
      this.report.dataset.clean = String(report.clean)
      const problems = report.problems ?? []
      this.report.replaceChildren(
        h('p', {}, report.clean ? 'Les comptes sont justes : aucun écart.' : `${problems.length} écart${problems.length > 1 ? 's' : ''} trouvé${problems.length > 1 ? 's' : ''}.`),
        report.clean ? null : h('pre', { class: 'platform__problems' }, JSON.stringify(problems, null, 2)),
      )
    } catch (error) {
      this.report.textContent = `Réconciliation impossible : ${error.message}`
    } finally {
      button.disabled = false
    }
  }
}

if (!customElements.get('admin-platform')) customElements.define('admin-platform', AdminPlatformElement)
