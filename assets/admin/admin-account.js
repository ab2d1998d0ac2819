// <admin-account user-id>: one account as an operator sees it (GET
// /admin/accounts/{userId}): balance, held, available, debt, grants in
// spend order with their expiries, active holds with their age, spending
// limits and the ceilings an operator set (changed with a reason), its
// auto-recharge, whether it has an own provider key (never the key),
// recent transactions and usages, its events with their delivery state
// (FAILED ones can be sent again), and what operators did on it. Credits
// and debits need a reason; the page makes each one's idempotency key (kept
// until it succeeds, so a retry never posts twice), and a debit asks for
// confirmation first. Event `admin-account:changed` after each action.

import { adoptStyles, formatCents, formatMicros, h, parseEuros, relativeDate, request, stylesheet } from '../credits/credits-api.js'

const STYLES = stylesheet(`
admin-account { display: grid; gap: 1rem; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
admin-account h2, admin-account h3 { margin: 0; }
admin-account h3 { font-size: 1rem; }
.account__summary { display: grid; grid-template-columns: repeat(auto-fill, minmax(10rem, 1fr)); gap: 0.5rem; margin: 0; }
.account__summary div { background: var(--bg-soft); border-radius: 0.4rem; padding: 0.5rem; }
.account__summary dt { color: var(--muted); font-size: 0.85rem; }
.account__summary dd { margin: 0; font-weight: 600; font-size: 1.1rem; }
.account__table { width: 100%; border-collapse: collapse; font-size: 0.9rem; }
.account__table th, .account__table td { text-align: left; padding: 0.3rem 0.4rem; border-bottom: 1px solid var(--border); overflow-wrap: anywhere; }
.account__section { display: grid; gap: 0.4rem; min-width: 0; overflow-x: auto; }
.account__empty { color: var(--muted); margin: 0; }
.adjust { display: grid; gap: 0.5rem; grid-template-columns: repeat(auto-fill, minmax(12rem, 1fr)); align-items: end; }
.adjust label { display: grid; gap: 0.2rem; font-size: 0.9rem; font-weight: 600; }
.adjust input, .adjust select { font: inherit; padding: 0.4rem 0.5rem; border: 1px solid var(--border); border-radius: 0.4rem; min-width: 0; }
.adjust__reason { grid-column: 1 / -1; }
.adjust__buttons { display: flex; gap: 0.5rem; flex-wrap: wrap; grid-column: 1 / -1; }
.adjust__confirm { border-color: var(--danger); color: var(--danger); }
.account__status { margin: 0; }
.account__status[data-state="error"] { color: var(--danger); }
.event__status[data-status="FAILED"] { color: var(--danger); font-weight: 600; }
`)

const STATUS = { PENDING: 'en attente', DELIVERED: 'livré', FAILED: 'en échec' }

function table(headers, rows) {
  if (rows.length === 0) return h('p', { class: 'account__empty' }, 'Aucun.')
  return h(
    'table',
    { class: 'account__table' },
    h('thead', {}, h('tr', {}, ...headers.map((name) => h('th', { scope: 'col' }, name)))),
    h('tbody', {}, ...rows),
  )
}

function row(...cells) {
  return h('tr', {}, ...cells.map((cell) => h('td', {}, cell)))
}

function autoRecharge(account) {
  const settings = account.autoRecharge
  if (!settings) return account.hasSavedCard ? 'jamais réglée (carte enregistrée)' : 'jamais réglée'
  if (settings.enabled) return `activée : ${formatCents(settings.amountCents)} sous ${formatCents(settings.thresholdCents)}`
  if (settings.disabledReason === 'operator') return 'désactivée par un opérateur'
  return settings.disabledReason ? `désactivée par creditd (${settings.disabledReason})` : 'désactivée'
}

function date(iso) {
  return iso ? new Date(iso).toLocaleString('fr-FR', { timeZone: 'UTC' }) + ' UTC' : 'jamais'
}

class AdminAccountElement extends HTMLElement {
  static get observedAttributes() {
    return ['user-id']
  }

  connectedCallback() {
    adoptStyles(this, STYLES)
    this.key = crypto.randomUUID()
  }

  attributeChangedCallback() {
    this.key = crypto.randomUUID()
    this.load()
  }

  get userId() {
    return this.getAttribute('user-id')
  }

  async load() {
    const id = this.userId
    if (!id) return
    this.hidden = false
    this.dataset.state = 'loading'
    const path = encodeURIComponent(id)
    try {
      const [account, limits, events, actions] = await Promise.all([
        request(this, `/admin/accounts/${path}`),
        request(this, `/admin/accounts/${path}/limits`),
        request(this, `/admin/events?userId=${path}&limit=50`),
        request(this, `/admin/actions?userId=${path}`),
      ])
      if (id !== this.userId) return
      this.render(account, limits, events.events, actions.actions)
      this.dataset.state = 'ok'
      this.dataset.balanceMicros = String(account.balanceMicros)
    } catch (error) {
      this.dataset.state = 'error'
      this.replaceChildren(h('p', { class: 'account__status', 'data-state': 'error', role: 'alert' }, `Compte indisponible : ${error.message}`))
    }
  }

  render(account, limits, events, actions) {
    const debt = account.balanceMicros < 0 ? -account.balanceMicros : 0
    this.status = h('p', { class: 'account__status', role: 'status' })
    this.replaceChildren(
      h('h2', {}, `Compte ${account.userId}`),
      h(
        'dl',
        { class: 'account__summary' },
        ...[
          ['balance', 'Solde', formatMicros(account.balanceMicros)],
          ['held', 'Réservé', formatMicros(account.heldMicros)],
          ['available', 'Disponible', formatMicros(account.availableMicros)],
          ['debt', 'Dette', formatMicros(debt)],
          ['plan', 'Offre', account.plan],
          ['byok', 'Clé personnelle (BYOK)', account.hasByok ? 'enregistrée' : 'aucune'],
          ['auto-recharge', 'Recharge automatique', autoRecharge(account)],
        ].map(([key, label, value]) => h('div', { 'data-key': key }, h('dt', {}, label), h('dd', {}, value))),
      ),
      this.adjustForm(),
      this.status,
      this.section('Crédits (ordre de dépense)', table(['Type', 'Montant', 'Reste', 'Expire', 'Origine'],
        account.grants.map((g) => row(g.kind === 'PAID' ? 'Payé' : 'Offert', formatMicros(g.amountMicros), formatMicros(g.remainingMicros), date(g.expiresAt), g.source)))),
      account.autoRecharge?.enabled ? this.section('Recharge automatique', this.rechargeOffForm()) : '',
      this.section('Limites de dépense', this.limits(limits)),
      this.section('Réservations actives', table(['Montant', 'Âge', 'Expire'],
        account.holds.map((hold) => row(formatMicros(hold.amountMicros), relativeDate(hold.createdAt), date(hold.expiresAt))))),
      this.section('Transactions récentes', table(['Date', 'Type', 'Montant', 'Solde après', 'Motif'],
        account.transactions.map((t) => row(date(t.createdAt), t.type, formatMicros(t.direction === 'DEBIT' ? -t.amountMicros : t.amountMicros, { signed: true }), formatMicros(t.balanceAfterMicros), t.description ?? '')))),
      this.section('Utilisation récente', table(['Date', 'Modèle', 'Jetons', 'Coût'],
        account.usages.map((u) => row(date(u.createdAt), u.model, String(u.totalTokens), formatMicros(u.costMicros, { decimals: 4, roundUp: true }))))),
      this.section('Événements', table(['Date', 'Type', 'N°', 'État', 'Tentatives', 'Dernière erreur', ''],
        events.map((event) => this.eventRow(event)))),
      this.section('Actions des opérateurs', table(['Date', 'Opérateur', 'Action', 'Motif'],
        actions.map((a) => row(date(a.at), a.operator, a.action, a.reason ?? '')))),
    )
  }

  limits(limits) {
    const none = (micros) => (micros === null ? 'aucune' : formatMicros(micros))
    const ceilings = this.ceilingsForm(limits)
    return h(
      'div',
      {},
      table(['Fenêtre', 'Limite de la personne', 'Plafond', 'Appliquée', 'Dépensé'], [
        row('Jour (UTC)', none(limits.dailyMicros), none(limits.dailyCeilingMicros), none(limits.daily.limitMicros), formatMicros(limits.spentTodayMicros)),
        row('Mois (UTC)', none(limits.monthlyMicros), none(limits.monthlyCeilingMicros), none(limits.monthly.limitMicros), formatMicros(limits.spentThisMonthMicros)),
      ]),
      ceilings,
    )
  }

  ceilingsForm(limits) {
    const euros = (micros) => (micros === null ? '' : (micros / 1000000).toFixed(2))
    const daily = h('input', { name: 'dailyCeiling', inputmode: 'decimal', value: euros(limits.dailyCeilingMicros), placeholder: 'aucun', autocomplete: 'off' })
    const monthly = h('input', { name: 'monthlyCeiling', inputmode: 'decimal', value: euros(limits.monthlyCeilingMicros), placeholder: 'aucun', autocomplete: 'off' })
    const reason = h('input', { name: 'ceilingReason', required: true, maxlength: '500', autocomplete: 'off' })
    const submit = h('button', { type: 'submit', class: 'ceilings__submit' }, 'Enregistrer les plafonds')
    const form = h(
      'form',
      { class: 'adjust ceilings' },
      h('label', {}, 'Plafond quotidien (€)', daily),
      h('label', {}, 'Plafond mensuel (€)', monthly),
      h('label', { class: 'adjust__reason' }, 'Motif (obligatoire)', reason),
      h('div', { class: 'adjust__buttons' }, submit),
    )
    const micros = (input, field) => {
      if (!input.value.trim()) return null
      const cents = parseEuros(input.value)
      if (cents === null) throw new Error(`${field} : des euros, deux décimales au plus, ou vide pour aucun`)
      return cents * 10000
    }
    form.addEventListener('submit', async (event) => {
      event.preventDefault()
      let body
      try {
        if (!reason.value.trim()) throw new Error('motif : obligatoire')
        // The owner's own limits are sent back as they are: only the ceilings change.
        body = {
          dailyMicros: limits.dailyMicros,
          monthlyMicros: limits.monthlyMicros,
          dailyCeilingMicros: micros(daily, 'plafond quotidien'),
          monthlyCeilingMicros: micros(monthly, 'plafond mensuel'),
          reason: reason.value.trim(),
        }
      } catch (error) {
        this.fail(error.message)
        return
      }
      submit.disabled = true
      try {
        await request(this, `/admin/accounts/${encodeURIComponent(this.userId)}/limits`, { method: 'PUT', body })
        this.changed()
        await this.load()
        this.status.textContent = 'Plafonds enregistrés.'
      } catch (error) {
        submit.disabled = false
        this.fail(`Plafonds refusés : ${error.message}`)
      }
    })
    return form
  }

  rechargeOffForm() {
    const reason = h('input', { name: 'rechargeOffReason', required: true, maxlength: '500', autocomplete: 'off' })
    const submit = h('button', { type: 'submit', class: 'recharge-off__submit' }, 'Désactiver la recharge automatique')
    const form = h('form', { class: 'adjust' }, h('label', { class: 'adjust__reason' }, 'Motif (obligatoire)', reason), h('div', { class: 'adjust__buttons' }, submit))
    form.addEventListener('submit', async (event) => {
      event.preventDefault()
      if (!reason.value.trim()) {
        this.fail('motif : obligatoire')
        return
      }
      submit.disabled = true
      try {
        await request(this, `/admin/accounts/${encodeURIComponent(this.userId)}/auto-recharge/off`, { method: 'POST', body: { reason: reason.value.trim() } })
        this.changed()
        await this.load()
        this.status.textContent = 'Recharge automatique désactivée.'
      } catch (error) {
        submit.disabled = false
        this.fail(`Désactivation refusée : ${error.message}`)
      }
    })
    return form
  }

  section(title, content) {
    return h('section', { class: 'account__section' }, h('h3', {}, title), content)
  }

  eventRow(event) {
    const state = h('span', { class: 'event__status', 'data-status': event.status }, STATUS[event.status] ?? event.status)
    const action = event.status === 'FAILED' ? h('button', { type: 'button', class: 'event__redeliver', 'data-event-id': event.id }, 'Renvoyer') : ''
    if (action) action.addEventListener('click', () => this.redeliver(event.id, action))
    const tr = row(date(event.createdAt), event.type, event.sequence === null ? '' : String(event.sequence), state, String(event.attempts), event.lastError ?? '', action)
    tr.dataset.eventId = event.id
    tr.dataset.status = event.status
    return tr
  }

  async redeliver(id, button) {
    button.disabled = true
    try {
      await request(this, `/admin/events/${encodeURIComponent(id)}/redeliver`, { method: 'POST' })
      this.changed()
      await this.load()
      this.status.textContent = 'Événement remis en file.'
    } catch (error) {
      button.disabled = false
      this.fail(`Renvoi impossible : ${error.message}`)
    }
  }

  adjustForm() {
    const amount = h('input', { name: 'amount', inputmode: 'decimal', required: true, placeholder: '5,00', autocomplete: 'off' })
    const direction = h('select', { name: 'direction' }, h('option', { value: 'credit' }, 'Créditer'), h('option', { value: 'debit' }, 'Débiter'))
    const kind = h('select', { name: 'type' }, h('option', { value: 'ADJUSTMENT' }, 'Ajustement'), h('option', { value: 'PROMO_BONUS' }, 'Promotion'))
    const expires = h('input', { name: 'expiresAt', type: 'date' })
    const reason = h('input', { name: 'reason', required: true, maxlength: '500', autocomplete: 'off' })
    const submit = h('button', { type: 'submit', class: 'adjust__submit' }, 'Appliquer')
    const confirm = h('button', { type: 'button', class: 'adjust__confirm', hidden: true })
    const cancel = h('button', { type: 'button', class: 'adjust__cancel', hidden: true }, 'Annuler')
    const form = h(
      'form',
      { class: 'adjust' },
      h('label', {}, 'Montant (€)', amount),
      h('label', {}, 'Sens', direction),
      h('label', {}, 'Type', kind),
      h('label', {}, 'Expire le (crédit)', expires),
      h('label', { class: 'adjust__reason' }, 'Motif (obligatoire)', reason),
      h('div', { class: 'adjust__buttons' }, submit, confirm, cancel),
    )
    const body = () => {
      const cents = parseEuros(amount.value)
      if (cents === null || cents === 0) throw new Error('montant : des euros, deux décimales au plus (5 ou 5,50)')
      if (!reason.value.trim()) throw new Error('motif : obligatoire')
      const micros = cents * 10000
      const debit = direction.value === 'debit'
      const payload = { amountMicros: debit ? -micros : micros, key: this.key, reason: reason.value.trim() }
      if (!debit && kind.value === 'PROMO_BONUS') payload.type = 'PROMO_BONUS'
      if (!debit && expires.value) payload.expiresAt = new Date(`${expires.value}T23:59:59Z`).toISOString()
      return payload
    }
    const reset = () => {
      confirm.hidden = true
      cancel.hidden = true
      submit.hidden = false
    }
    form.addEventListener('submit', (event) => {
      event.preventDefault()
      let payload
      try {
        payload = body()
      } catch (error) {
        this.fail(error.message)
        return
      }
      if (payload.amountMicros < 0) {
        confirm.textContent = `Confirmer le débit de ${formatMicros(-payload.amountMicros)}`
        confirm.hidden = false
        cancel.hidden = false
        submit.hidden = true
        confirm.onclick = () => this.adjust(payload, confirm)
        return
      }
      this.adjust(payload, submit)
    })
    cancel.addEventListener('click', reset)
    for (const input of [amount, direction, reason]) input.addEventListener('input', reset)
    return form
  }

  async adjust(payload, button) {
    button.disabled = true
    try {
      const done = await request(this, `/admin/accounts/${encodeURIComponent(this.userId)}/credits`, { method: 'POST', body: payload })
      this.key = crypto.randomUUID()
      this.changed()
      await this.load()
      this.status.textContent = `${payload.amountMicros < 0 ? 'Débit' : 'Crédit'} de ${formatMicros(Math.abs(payload.amountMicros))} enregistré : solde ${formatMicros(done.balanceMicros)}.`
    } catch (error) {
      button.disabled = false
      this.fail(`Opération refusée : ${error.message}`)
    }
  }

  fail(message) {
    this.status.dataset.state = 'error'
    this.status.textContent = message
  }

  changed() {
    this.dispatchEvent(new CustomEvent('admin-account:changed', { bubbles: true, detail: { userId: this.userId } }))
  }
}

if (!customElements.get('admin-account')) customElements.define('admin-account', AdminAccountElement)
