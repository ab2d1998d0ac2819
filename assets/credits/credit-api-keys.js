// <credit-api-keys>: the person's API keys for the apps they build (the
// OpenAI- and Anthropic-compatible routes under /v1): make one (a name, an
// optional spend limit in euros, an optional last day), see its secret
// once, list the keys with what each spent and when it was last used,
// revoke one. Amounts are typed in euros (`12,50`) and sent as a decimal
// string; nothing is computed in floating point. Dispatches
// `credit-api-keys:created` (detail: the key as listed, never its secret).

import { adoptStyles, formatMicros, h, parseEuros, relativeDate, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
credit-api-keys { display: block; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
credit-api-keys h2 { margin: 0 0 0.75rem; font-size: 1.1rem; }
.api-keys__hint, .api-keys__message, .api-keys__empty { margin: 0 0 0.75rem; color: var(--muted); }
.api-keys__form { display: grid; grid-template-columns: repeat(auto-fit, minmax(12rem, 1fr)); gap: 0.75rem 1rem; align-items: end; margin-bottom: 1rem; }
.api-keys__field { display: grid; gap: 0.25rem; min-width: 0; }
.api-keys__label { font-weight: 600; font-size: 0.9rem; }
.api-keys__input { font: inherit; padding: 0.45rem 0.6rem; border: 1px solid var(--border); border-radius: 0.4rem; min-width: 0; }
.api-keys__create { justify-self: start; }
.api-keys__status { margin: 0; grid-column: 1 / -1; }
.api-keys__status[data-state="error"] { color: var(--danger); }
.api-keys__created { margin: 0 0 1rem; padding: 0.75rem; border-radius: 0.4rem; background: var(--bg-soft); overflow-wrap: anywhere; }
.api-keys__secret { display: block; margin-top: 0.35rem; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; user-select: all; }
.api-keys__list { list-style: none; margin: 0; padding: 0; display: grid; gap: 0.5rem; }
.api-keys__item { display: flex; flex-wrap: wrap; gap: 0.25rem 1rem; align-items: center; justify-content: space-between; border-top: 1px solid var(--border); padding-top: 0.5rem; min-width: 0; }
.api-keys__name { font-weight: 600; overflow-wrap: anywhere; }
.api-keys__prefix { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; color: var(--muted); }
.api-keys__usage { margin: 0; font-size: 0.85rem; color: var(--muted); flex: 1 1 16rem; overflow-wrap: anywhere; }
`)

const dateFormat = new Intl.DateTimeFormat('fr', { dateStyle: 'medium', timeZone: 'UTC' })

class CreditApiKeysElement extends HTMLElement {
  connectedCallback() {
    adoptStyles(this, STYLES)
    if (!this.dataset.state) {
      this.dataset.state = 'loading'
      this.replaceChildren(h('p', { class: 'api-keys__message' }, 'Chargement…'))
    }
    this.load()
  }

  async load(created = null) {
    try {
      this.render((await request(this, '/api/credits/api-keys')).keys, created)
    } catch (error) {
      this.dataset.state = error.status === 401 ? 'signed-out' : 'error'
      this.replaceChildren(
        h('h2', {}, 'Clés API'),
        h('p', { class: 'api-keys__message', role: 'alert' }, error.status === 401 ? 'Connectez-vous pour voir vos clés API.' : `Clés API indisponibles : ${error.message}`),
      )
    }
  }

  render(keys, created) {
    this.dataset.state = 'ok'
    const form = this.form()
    const parts = [
      h('h2', {}, 'Clés API'),
      h('p', { class: 'api-keys__hint' }, 'Vos applications appellent l’IA avec ces clés (formats OpenAI et Anthropic, sous /v1) ; chaque appel est payé par vos crédits.'),
      form,
      created === null ? null : h('p', { class: 'api-keys__created', role: 'status' },
        `Clé « ${created.apiKey.name} » créée. Copiez-la maintenant : elle ne sera plus affichée.`,
        h('code', { class: 'api-keys__secret' }, created.key)),
      keys.length === 0
        ? h('p', { class: 'api-keys__empty' }, 'Aucune clé API pour le moment.')
        : h('ul', { class: 'api-keys__list' }, ...keys.map((key) => this.item(key))),
    ]
    this.replaceChildren(...parts.filter((part) => part !== null))
  }

  form() {
    const field = (id, label, attributes) => h('div', { class: 'api-keys__field' },
      h('label', { for: id, class: 'api-keys__label' }, label),
      h('input', { id, class: 'api-keys__input', autocomplete: 'off', ...attributes }))
    const form = h('form', { class: 'api-keys__form', novalidate: true },
      field('api-key-name', 'Nom', { name: 'name', maxlength: 100, placeholder: 'Mon application' }),
      field('api-key-limit', 'Limite de dépense (€)', { name: 'limit', inputmode: 'decimal', placeholder: 'Aucune' }),
      field('api-key-expiry', 'Valable jusqu’au', { name: 'expiry', type: 'date' }),
      h('button', { type: 'submit', class: 'api-keys__create' }, 'Créer la clé'),
      h('p', { class: 'api-keys__status', role: 'status' }))
    form.addEventListener('submit', (event) => {
      event.preventDefault()
      this.create(form)
    })
    return form
  }

  item(key) {
    const limit = key.spendLimitMicros === null ? 'sans limite' : `sur ${formatMicros(key.spendLimitMicros)}`
    const used = key.lastUsedAt === null ? 'jamais utilisée' : `utilisée ${relativeDate(key.lastUsedAt)}`
    const expiry = key.expiresAt === null ? '' : ` · valable jusqu’au ${dateFormat.format(new Date(key.expiresAt))}`
    const revoke = h('button', { type: 'button', class: 'api-keys__revoke', 'aria-label': `Révoquer la clé ${key.name}` }, 'Révoquer')
    revoke.addEventListener('click', () => this.revoke(key, revoke))
    return h('li', { class: 'api-keys__item', 'data-key-id': key.id },
      h('span', { class: 'api-keys__name' }, key.name),
      h('span', { class: 'api-keys__prefix' }, `${key.prefix}…`),
      h('p', { class: 'api-keys__usage' },
        `${formatMicros(key.spentMicros, { roundUp: true })} dépensés ${limit} · créée le ${dateFormat.format(new Date(key.createdAt))} · ${used}${expiry}`),
      revoke)
  }

  /** The form's key as the API takes it, or a French message naming the field. */
  asked(form) {
    const name = form.elements.name.value.trim()
    if (name === '') return { error: 'Nom : donnez un nom à la clé, par exemple celui de votre application.' }
    const body = { name }
    const limit = form.elements.limit.value.trim()
    if (limit !== '') {
      const cents = parseEuros(limit)
      if (cents === null || cents === 0) return { error: 'Limite de dépense : saisissez un montant en euros, par exemple 12,50.' }
      body.spendLimitEur = `${Math.trunc(cents / 100)}.${String(cents % 100).padStart(2, '0')}`
    }
    const expiry = form.elements.expiry.value
    if (expiry !== '') body.expiresAt = `${expiry}T23:59:59Z`
    return { body }
  }

  async create(form) {
    const status = form.querySelector('.api-keys__status')
    const { body, error } = this.asked(form)
    if (error) {
      status.dataset.state = 'error'
      status.textContent = error
      return
    }
    const button = form.querySelector('.api-keys__create')
    button.disabled = true
    try {
      const created = await request(this, '/api/credits/api-keys', { method: 'POST', body })
      await this.load(created)
      this.dispatchEvent(new CustomEvent('credit-api-keys:created', { bubbles: true, detail: created.apiKey }))
      this.querySelector('.api-keys__secret')?.focus?.()
    } catch (failure) {
      button.disabled = false
      status.dataset.state = 'error'
      status.textContent = failure.message.includes('expiresAt')
        ? 'Valable jusqu’au : choisissez une date à venir.'
        : `Clé non créée : ${failure.message}`
    }
  }

  async revoke(key, button) {
    button.disabled = true
    try {
      await request(this, `/api/credits/api-keys/${encodeURIComponent(key.id)}`, { method: 'DELETE' })
      await this.load()
    } catch (failure) {
      button.disabled = false
      button.textContent = `Révocation impossible : ${failure.message}`
    }
  }
}

if (!customElements.get('credit-api-keys')) customElements.define('credit-api-keys', CreditApiKeysElement)
