// <credit-balance variant="compact|full" for="topup">: the person's AI credits, the
// low-balance warning and a "Recharger" button. Hidden for people who use
// their own provider keys (BYOK): they are never charged. The full variant
// also lists what the balance is made of (its grants, in the order they
// are spent: offered credits first, the soonest to expire first).
//
// Events: `credit-balance:loaded` (detail: the `/api/credits` answer) after
// every load; `credit-balance:topup` (cancelable) when "Recharger" is
// pressed; unless canceled, the <credit-topup-dialog> whose id `for` names
// opens. `refresh()` reloads it (the page calls it after a payment).
//
// Live: once loaded it listens to `/api/credits/stream` (Server-Sent
// Events, authenticated by the `__session` cookie) and redraws on every
// `balance` event of another version than the one shown, then dispatches
// `credit-balance:changed` (detail: the event's data). It falls back to
// reloading every `poll-interval` ms (default 30000; 0: never) when the
// stream cannot open: no EventSource in
// the browser, or an error while the browser is not reconnecting (a
// refusal, such as 401 on a page that signs in with a bearer token only,
// or 429 when the person has too many tabs open). A stream that ends (a
// deploy) is reconnected by the browser itself. `data-live` says which:
// `stream` or `poll`.

import { adoptStyles, formatMicros, h, referenced, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
credit-balance { display: block; }
credit-balance[variant="full"] { border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
credit-balance[data-state="low"][variant="full"] { border-color: var(--danger); }
.credit-balance__card { display: flex; flex-wrap: wrap; align-items: center; justify-content: space-between; gap: 0.75rem; }
.credit-balance__label { margin: 0; color: var(--muted); font-size: 0.9rem; }
.credit-balance__card .credit-balance__amount { margin: 0; font-size: 1.75rem; font-weight: 700; }
.credit-balance__topup { background: var(--accent); color: #fff; border-color: var(--accent); }
.credit-balance__grants { list-style: none; margin: 0.75rem 0 0; padding: 0; display: grid; gap: 0.35rem; font-size: 0.9rem; }
.credit-balance__grant { display: flex; flex-wrap: wrap; gap: 0.25rem 0.75rem; align-items: baseline; }
.credit-balance__grant-kind { font-weight: 600; min-width: 4rem; }
.credit-balance__grant[data-kind="PROMO"] .credit-balance__grant-kind { color: var(--credit); }
.credit-balance__grant-expiry { color: var(--muted); }
.credit-balance__compact { background: #fff; color: var(--fg); border-color: var(--border); font-weight: 600; }
credit-balance[data-state="low"] .credit-balance__compact { border-color: var(--danger); color: var(--danger); }
.credit-balance__warning { color: var(--danger); margin: 0.75rem 0 0; }
.credit-balance__message { margin: 0; color: var(--muted); }
`)

/** How often the balance reloads when its stream cannot open. */
const DEFAULT_POLL_INTERVAL_MS = 30000

class CreditBalanceElement extends HTMLElement {
  static observedAttributes = ['variant']

  connectedCallback() {
    adoptStyles(this, STYLES)
    if (!this.dataset.state) this.renderLoading()
    // A page left (or kept in the back-forward cache) holds no stream open:
    // browsers allow few connections per server.
    this.onPageHide = () => this.stopListening()
    this.onPageShow = (event) => {
      if (event.persisted) this.refresh().then((data) => data && this.listen())
    }
    window.addEventListener('pagehide', this.onPageHide)
    window.addEventListener('pageshow', this.onPageShow)
    this.refresh().then((data) => {
      // Signed out: nothing to follow until the person signs in.
      if (data) this.listen()
      else if (this.dataset.state !== 'signed-out') this.poll()
    })
  }

  disconnectedCallback() {
    window.removeEventListener('pagehide', this.onPageHide)
    window.removeEventListener('pageshow', this.onPageShow)
    this.stopListening()
  }

  stopListening() {
    this.source?.close()
    this.source = null
    clearInterval(this.timer)
    this.timer = null
  }

  /** Follows the balance live: the stream, else polling. */
  listen() {
    if (this.source || this.timer || !this.isConnected) return
    if (typeof EventSource !== 'function') {
      this.poll()
      return
    }
    const base = this.closest('[api-base]')?.getAttribute('api-base') ?? ''
    const source = new EventSource(`${base}/api/credits/stream`, { withCredentials: base !== '' })
    this.source = source
    source.addEventListener('open', () => {
      this.dataset.live = 'stream'
    })
    source.addEventListener('balance', (event) => this.changed(JSON.parse(event.data)))
    source.addEventListener('error', () => {
      // CONNECTING: the browser reconnects by itself. CLOSED: refused.
      if (source.readyState !== EventSource.CLOSED || this.source !== source) return
      this.source = null
      this.poll()
    })
  }

  /** Reloads every `poll-interval` ms (the stream could not open). */
  poll() {
    this.dataset.live = 'poll'
    const interval = Number(this.getAttribute('poll-interval') ?? DEFAULT_POLL_INTERVAL_MS)
    if (!(interval > 0) || !this.isConnected) return
    this.timer = setInterval(() => this.refresh(), interval)
  }

  /** A `balance` event: the balance part of the last answer replaced. */
  changed(event) {
    // The same version shows nothing new (the event sent when the stream opens).
    if (!this.data || event.version === this.data.version) return
    this.render({ ...this.data, ...event })
    this.dispatchEvent(new CustomEvent('credit-balance:changed', { bubbles: true, detail: event }))
  }

  /** A new variant redraws the last answer (no reload). */
  attributeChangedCallback(name, previous, value) {
    if (previous !== value && this.data) this.render(this.data)
  }

  get variant() {
    return this.getAttribute('variant') === 'full' ? 'full' : 'compact'
  }

  /** Reloads the balance; resolves with the `/api/credits` answer or null. */
  async refresh() {
    try {
      const data = await request(this, '/api/credits')
      this.render(data)
      this.dispatchEvent(new CustomEvent('credit-balance:loaded', { bubbles: true, detail: data }))
      return data
    } catch (error) {
      this.renderError(error)
      return null
    }
  }

  renderLoading() {
    this.dataset.state = 'loading'
    this.replaceChildren(h('span', { class: 'credit-balance__loading' }, 'Chargement…'))
  }

  renderError(error) {
    this.hidden = false
    if (error.status === 401) {
      this.dataset.state = 'signed-out'
      this.replaceChildren(h('p', { class: 'credit-balance__message' }, 'Connectez-vous pour voir vos crédits.'))
    } else {
      this.dataset.state = 'error'
      this.replaceChildren(h('p', { class: 'credit-balance__message', role: 'alert' }, `Solde indisponible : ${error.message}`))
    }
  }

  render(data) {
    this.data = data
    this.dataset.balanceMicros = String(data.balanceMicros)
    if (data.hasByok) {
      this.dataset.state = 'byok'
      this.hidden = true
      this.replaceChildren()
      return
    }
    this.hidden = false
    this.dataset.state = data.isLow ? 'low' : 'ok'
    const amount = formatMicros(data.balanceMicros)
    const topup = h('button', { type: 'button', class: 'credit-balance__topup' })
    topup.addEventListener('click', () => this.requestTopup(topup))
    if (this.variant === 'compact') {
      topup.classList.add('credit-balance__compact')
      topup.setAttribute('aria-label', `Crédits AI : ${amount}. Recharger`)
      topup.append(h('span', { class: 'credit-balance__amount' }, amount))
      if (data.isLow) topup.append(h('span', { class: 'credit-balance__low-mark', 'aria-hidden': 'true' }, '↘'))
      this.replaceChildren(topup)
      return
    }
    topup.textContent = 'Recharger'
    const warning = data.isLow
      ? h('p', { class: 'credit-balance__warning', role: 'status' }, "⚠ Solde faible. Rechargez pour continuer à utiliser l'IA.")
      : null
    this.replaceChildren(
      ...this.card(amount, topup),
      ...(warning ? [warning] : []),
      ...this.grants(data.grants ?? []),
    )
  }

  card(amount, topup) {
    return [
      h(
        'div',
        { class: 'credit-balance__card' },
        h(
          'div',
          {},
          h('p', { class: 'credit-balance__label' }, 'Crédits AI'),
          h('p', { class: 'credit-balance__amount' }, amount),
        ),
        topup,
      ),
    ]
  }

  /** The grants with money left: kind, what is left, and when it expires. */
  grants(grants) {
    if (grants.length === 0) return []
    const items = grants.map((grant) =>
      h(
        'li',
        { class: 'credit-balance__grant', 'data-kind': grant.kind },
        h('span', { class: 'credit-balance__grant-kind' }, grant.kind === 'PAID' ? 'Payé' : 'Offert'),
        h('span', { class: 'credit-balance__grant-remaining' }, formatMicros(grant.remainingMicros)),
        h(
          'span',
          { class: 'credit-balance__grant-expiry' },
          grant.expiresAt ? `expire le ${expiryDate(grant.expiresAt)}` : "n'expire pas",
        ),
      ),
    )
    return [h('ul', { class: 'credit-balance__grants', 'aria-label': 'Composition du solde' }, ...items)]
  }

  requestTopup(opener) {
    const event = new CustomEvent('credit-balance:topup', { bubbles: true, cancelable: true })
    if (this.dispatchEvent(event)) referenced(this)?.open?.(opener)
  }
}

/** "15 juin 2030": a grant's expiry day, in French, in the reader's time zone. */
function expiryDate(iso) {
  return new Date(iso).toLocaleDateString('fr-FR', { day: 'numeric', month: 'long', year: 'numeric' })
}

if (!customElements.get('credit-balance')) customElements.define('credit-balance', CreditBalanceElement)
