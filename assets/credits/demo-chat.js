// <demo-chat model="demo-echo" for="balance">: the demo's chat box. Each
// message is a real POST /api/chat: held before the call, charged per token
// after it. The <credit-balance> whose id `for` names reloads after the
// bonus and after every answer. Event: `demo-chat:charged` (detail: the
// chat's answer) after every answer.

import { adoptStyles, formatMicros, h, referenced, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
demo-chat { display: block; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
demo-chat h2 { margin: 0 0 0.75rem; font-size: 1.1rem; }
.chat__log { list-style: none; padding: 0; margin: 0 0 0.75rem; display: grid; gap: 0.5rem; }
.chat__message { padding: 0.5rem 0.75rem; border-radius: 0.5rem; background: var(--bg-soft); overflow-wrap: anywhere; }
.chat__message.is-user { background: #ddf4ff; }
.chat__cost { display: block; color: var(--muted); margin-top: 0.25rem; }
.chat__form { display: grid; gap: 0.5rem; }
.chat__form label { display: grid; gap: 0.25rem; color: var(--muted); font-size: 0.9rem; }
.chat__input { font: inherit; padding: 0.5rem; border: 1px solid var(--border); border-radius: 0.4rem; width: 100%; }
.chat__send { justify-self: end; background: var(--accent); color: #fff; border-color: var(--accent); }
.chat__error { color: var(--danger); margin: 0; }
`)

class DemoChatElement extends HTMLElement {
  static observedAttributes = ['model']

  connectedCallback() {
    adoptStyles(this, STYLES)
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
    this.heading = h('h2', {}, `Chat (modèle ${this.model})`)
    this.replaceChildren(this.heading, this.log, this.form)
    this.claimBonus()
  }

  get model() {
    return this.getAttribute('model') ?? 'demo-echo'
  }

  /** A new model names itself in the heading; the next message uses it. */
  attributeChangedCallback(name, previous, value) {
    if (previous !== value && this.heading) this.heading.textContent = `Chat (modèle ${this.model})`
  }

  /** The signup bonus, as the app claims it for a new user (once ever). */
  async claimBonus() {
    try {
      const claimed = await request(this, '/api/credits/claim-bonus', { method: 'POST' })
      if (!claimed.alreadyClaimed) referenced(this)?.refresh?.()
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
        body: { model: this.model, maxTokens: 256, messages: [{ role: 'user', content }] },
      })
      const credits = answer.credits
      const cost = credits
        ? `Coût : ${formatMicros(credits.usedMicros, { decimals: 4, roundUp: true })} · ${credits.inputTokens} jetons en entrée / ${credits.outputTokens} en sortie · solde ${formatMicros(credits.balanceMicros)}`
        : 'Vos propres clés : non facturé'
      this.log.append(
        h('li', { class: 'chat__message is-user' }, content),
        h('li', { class: 'chat__message is-assistant', 'data-used-micros': credits?.usedMicros ?? 0 }, answer.content, h('small', { class: 'chat__cost' }, cost)),
      )
      this.dispatchEvent(new CustomEvent('demo-chat:charged', { bubbles: true, detail: answer }))
      referenced(this)?.refresh?.()
    } catch (failure) {
      this.error.textContent = failure.message
      this.error.hidden = false
    } finally {
      this.send.disabled = false
    }
  }
}

if (!customElements.get('demo-chat')) customElements.define('demo-chat', DemoChatElement)
