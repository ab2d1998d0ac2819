// <demo-chat model="demo-echo">: the demo's chat box. Each message is a real
// POST /api/chat: held before the call, charged per token after it; the
// balances on the page reload after every answer.

import { formatMicros, h, request } from './credits-api.js'

class DemoChatElement extends HTMLElement {
  connectedCallback() {
    if (this.form) return
    this.input = h('textarea', { name: 'message', rows: 3, required: true, class: 'chat__input' }, 'Crée une application de liste de tâches.')
    this.send = h('button', { type: 'submit', class: 'chat__send' }, 'Envoyer')
    this.log = h('ol', { class: 'chat__log', 'aria-live': 'polite' })
    this.error = h('p', { class: 'chat__error', role: 'alert', hidden: true })
    this.form = h('form', { class: 'chat__form' }, h('label', {}, 'Votre message', this.input), this.send, this.error)
    this.form.addEventListener('submit', (event) => {
      event.preventDefault()
      this.submit()
    })
    this.replaceChildren(h('h2', {}, 'Chat (modèle demo-echo)'), this.log, this.form)
    this.claimBonus()
  }

  /** The signup bonus, as the app claims it for a new user (once ever). */
  async claimBonus() {
    try {
      const claimed = await request(this, '/api/credits/claim-bonus', { method: 'POST' })
      if (!claimed.alreadyClaimed) document.dispatchEvent(new CustomEvent('credit-balance:refresh'))
    } catch (failure) {
      this.error.textContent = failure.status === 401 ? 'Connectez-vous (lien en haut de la page) pour recevoir le bonus et discuter.' : failure.message
      this.error.hidden = false
    }
  }

  async submit() {
    const content = this.input.value.trim()
    if (!content) return
    this.send.disabled = true
    this.error.hidden = true
    try {
      const answer = await request(this, '/api/chat', {
        method: 'POST',
        body: { model: this.getAttribute('model') ?? 'demo-echo', maxTokens: 256, messages: [{ role: 'user', content }] },
      })
      const credits = answer.credits
      const cost = credits
        ? `Coût : ${formatMicros(credits.usedMicros, { decimals: 4, roundUp: true })} · ${credits.inputTokens} jetons en entrée / ${credits.outputTokens} en sortie · solde ${formatMicros(credits.balanceMicros)}`
        : 'Vos propres clés : non facturé'
      this.log.append(
        h('li', { class: 'chat__message is-user' }, content),
        h('li', { class: 'chat__message is-assistant', 'data-used-micros': credits?.usedMicros ?? 0 }, answer.content, h('small', { class: 'chat__cost' }, cost)),
      )
      document.dispatchEvent(new CustomEvent('credit-balance:refresh'))
    } catch (failure) {
      this.error.textContent = failure.message
      this.error.hidden = false
    } finally {
      this.send.disabled = false
    }
  }
}

if (!customElements.get('demo-chat')) customElements.define('demo-chat', DemoChatElement)
