// <credit-topup-dialog min-cents="500" max-cents="100000">: choose an amount
// (5 €, 10 € (popular), 25 €, 50 € or a custom amount within the limits),
// then "Payer N€" opens a Stripe Checkout Session and goes there.
//
// A real <dialog> opened modally: focus moves in and stays inside, Escape
// and "Annuler" close it, focus goes back to what opened it.
// Events: `credit-topup:created` (cancelable, detail `{url, sessionId,
// amountCents}`) before leaving for Checkout; canceled, the page stays.
// Other elements open it by naming its id in their `for` attribute.

import { adoptStyles, formatCents, h, parseEuros, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
dialog.topup { border: 1px solid var(--border); border-radius: 0.75rem; padding: 1.25rem; width: min(28rem, calc(100vw - 1.5rem)); max-height: calc(100vh - 1.5rem); }
dialog.topup::backdrop { background: rgb(0 0 0 / 0.35); }
.topup h2 { margin: 0 0 0.25rem; font-size: 1.2rem; }
.topup__description { margin: 0 0 1rem; color: var(--muted); }
.topup__options { display: grid; grid-template-columns: repeat(2, minmax(0, 1fr)); gap: 0.5rem; }
.topup__option { position: relative; font-weight: 600; }
.topup__option[aria-pressed="true"] { background: var(--accent); color: #fff; border-color: var(--accent); }
.topup__popular { position: absolute; top: -0.6rem; right: -0.3rem; font-size: 0.7rem; background: #8250df; color: #fff; border-radius: 1rem; padding: 0 0.4rem; }
.topup__custom-label { display: block; margin-top: 1rem; color: var(--muted); font-size: 0.9rem; }
.topup__custom-row { display: flex; gap: 0.5rem; align-items: center; margin-top: 0.25rem; }
.topup__custom { flex: 1; min-width: 0; font: inherit; padding: 0.45rem 0.6rem; border: 1px solid var(--border); border-radius: 0.4rem; }
.topup__error { color: var(--danger); margin: 0.5rem 0 0; }
.topup__info { margin-top: 1rem; background: var(--bg-soft); border-radius: 0.4rem; padding: 0.6rem 0.8rem; font-size: 0.8rem; color: var(--muted); }
.topup__info p { margin: 0 0 0.25rem; font-weight: 600; }
.topup__info ul { margin: 0; padding-left: 1.1rem; }
.topup__actions { display: flex; justify-content: flex-end; gap: 0.5rem; margin-top: 1rem; flex-wrap: wrap; }
.topup__pay { background: var(--accent); color: #fff; border-color: var(--accent); }
`)

const OPTIONS = [
  { cents: 500, popular: false },
  { cents: 1000, popular: true },
  { cents: 2500, popular: false },
  { cents: 5000, popular: false },
]

/** Where the page remembers the Checkout Session it left for. */
export const PENDING_TOPUP_KEY = 'credit-topup:pending'

class CreditTopupDialogElement extends HTMLElement {
  static observedAttributes = ['min-cents', 'max-cents']

  connectedCallback() {
    adoptStyles(this, STYLES)
    if (this.dialog) return
    this.selected = 1000
    this.build()
  }

  /** New limits check the amount typed so far again. */
  attributeChangedCallback(name, previous, value) {
    if (previous !== value && this.dialog) this.update()
  }

  get minCents() {
    return Number(this.getAttribute('min-cents') ?? 500)
  }

  get maxCents() {
    return Number(this.getAttribute('max-cents') ?? 100000)
  }

  build() {
    this.options = OPTIONS.map(({ cents, popular }) => {
      const button = h(
        'button',
        { type: 'button', class: 'topup__option', 'data-cents': cents, 'aria-pressed': cents === this.selected ? 'true' : 'false' },
        formatCents(cents),
        popular ? h('span', { class: 'topup__popular' }, 'Populaire') : null,
      )
      button.addEventListener('click', () => this.choose(cents))
      return button
    })
    this.custom = h('input', {
      type: 'text',
      inputmode: 'decimal',
      name: 'custom-amount',
      class: 'topup__custom',
      placeholder: 'Ex. : 15',
      autocomplete: 'off',
      'aria-describedby': 'credit-topup-error',
    })
    this.custom.addEventListener('input', () => this.update())
    this.error = h('p', { id: 'credit-topup-error', class: 'topup__error', role: 'alert', hidden: true })
    this.cancel = h('button', { type: 'button', class: 'topup__cancel' }, 'Annuler')
    this.cancel.addEventListener('click', () => this.close())
    this.pay = h('button', { type: 'submit', class: 'topup__pay' })
    const form = h(
      'form',
      { method: 'dialog', novalidate: true },
      h('h2', { id: 'credit-topup-title' }, 'Recharger vos crédits'),
      h('p', { class: 'topup__description' }, "Ajoutez des crédits pour utiliser l'IA sans vos propres clés API."),
      h('div', { class: 'topup__options', role: 'group', 'aria-label': 'Montant' }, ...this.options),
      h(
        'label',
        { class: 'topup__custom-label' },
        'Ou montant personnalisé',
        h('span', { class: 'topup__custom-row' }, this.custom, h('span', { 'aria-hidden': 'true' }, '€')),
      ),
      this.error,
      h(
        'div',
        { class: 'topup__info' },
        h('p', {}, 'Comment ça marche ?'),
        h(
          'ul',
          {},
          h('li', {}, '~1000 messages avec Claude pour 10€'),
          h('li', {}, 'Facturation au token réel utilisé'),
          h('li', {}, "Pas d'expiration des crédits"),
        ),
      ),
      h('div', { class: 'topup__actions' }, this.cancel, this.pay),
    )
    form.addEventListener('submit', (event) => {
      event.preventDefault()
      this.submit()
    })
    this.dialog = h('dialog', { class: 'topup', 'aria-labelledby': 'credit-topup-title' }, form)
    this.dialog.addEventListener('close', () => this.restoreFocus())
    this.append(this.dialog)
    this.update()
  }

  /** Opens the dialog; focus returns to `opener` (or the focused element) on close. */
  open(opener = document.activeElement) {
    this.opener = opener
    this.showError(null)
    if (!this.dialog.open) this.dialog.showModal()
    this.options.find((b) => b.getAttribute('aria-pressed') === 'true')?.focus()
  }

  close() {
    if (this.dialog.open) this.dialog.close()
  }

  restoreFocus() {
    if (this.opener instanceof HTMLElement && this.opener.isConnected) this.opener.focus()
  }

  choose(cents) {
    this.selected = cents
    this.custom.value = ''
    this.update()
  }

  /** The amount to pay in cents, or an error message in the design's words. */
  amount() {
    const text = this.custom.value.trim()
    if (text === '') return { cents: this.selected }
    const cents = parseEuros(text)
    if (cents === null) return { error: 'Montant invalide' }
    if (cents < this.minCents) return { cents, error: `Minimum ${formatCents(this.minCents)}` }
    if (cents > this.maxCents) return { cents, error: `Maximum ${formatCents(this.maxCents)}` }
    return { cents }
  }

  update() {
    const custom = this.custom.value.trim() !== ''
    for (const button of this.options) {
      const pressed = !custom && Number(button.dataset.cents) === this.selected
      button.setAttribute('aria-pressed', pressed ? 'true' : 'false')
    }
    const { cents } = this.amount()
    this.pay.textContent = cents === undefined ? 'Payer' : `Payer ${formatCents(cents)}`
    this.showError(null)
  }

  showError(message) {
    if (!this.error) return
    this.error.textContent = message ?? ''
    this.error.hidden = !message
  }

  setBusy(busy) {
    this.pay.disabled = busy
    this.pay.toggleAttribute('aria-busy', busy)
    this.dataset.busy = busy ? 'true' : 'false'
  }

  async submit() {
    const { cents, error } = this.amount()
    if (error) {
      this.showError(error)
      this.custom.focus()
      return
    }
    this.setBusy(true)
    this.showError(null)
    try {
      const { url, sessionId } = await request(this, '/api/credits/topup', { method: 'POST', body: { amount: cents } })
      const detail = { url, sessionId, amountCents: cents }
      const proceed = this.dispatchEvent(new CustomEvent('credit-topup:created', { bubbles: true, cancelable: true, detail }))
      if (!proceed) {
        this.setBusy(false)
        return
      }
      sessionStorage.setItem(PENDING_TOPUP_KEY, JSON.stringify({ sessionId, amountCents: cents }))
      window.location.assign(url)
    } catch (failure) {
      this.setBusy(false)
      this.showError(failure.message || 'Le paiement n’a pas pu être créé.')
    }
  }
}

if (!customElements.get('credit-topup-dialog')) customElements.define('credit-topup-dialog', CreditTopupDialogElement)
