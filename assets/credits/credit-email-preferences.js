// <credit-email-preferences>: whether the person receives alert emails
// (low balance, depleted, auto-recharge failed or switched off). Receipts
// of top-ups and auto-recharges are always sent. The checkbox saves at
// once; a refused save puts it back and says why.

import { adoptStyles, h, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
credit-email-preferences { display: block; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
credit-email-preferences h2 { margin: 0 0 0.75rem; font-size: 1.1rem; }
.email-preferences__row { display: flex; gap: 0.5rem; align-items: flex-start; }
.email-preferences__row input { margin-top: 0.25rem; }
.email-preferences__hint { margin: 0.5rem 0 0; color: var(--muted); }
.email-preferences__status { margin: 0.5rem 0 0; }
.email-preferences__status[data-state="error"] { color: var(--danger); }
`)

const PATH = '/api/credits/email-preferences'

class CreditEmailPreferencesElement extends HTMLElement {
  connectedCallback() {
    adoptStyles(this, STYLES)
    if (this.checkbox) return
    this.checkbox = h('input', { type: 'checkbox', id: 'email-alerts', name: 'alertEmails', disabled: true })
    this.status = h('p', { class: 'email-preferences__status', role: 'status' })
    this.checkbox.addEventListener('change', () => this.save(this.checkbox.checked))
    this.replaceChildren(
      h('h2', {}, 'E-mails'),
      h(
        'div',
        { class: 'email-preferences__row' },
        this.checkbox,
        h('label', { for: 'email-alerts' }, 'Me prévenir par e-mail quand mon solde est bas ou épuisé, et quand la recharge automatique échoue'),
      ),
      h('p', { class: 'email-preferences__hint' }, 'Les reçus de vos recharges sont toujours envoyés.'),
      this.status,
    )
    this.load()
  }

  async load() {
    try {
      this.show(await request(this, PATH))
    } catch (error) {
      this.fail(error.status === 401 ? 'Connectez-vous pour choisir vos e-mails.' : `Préférences indisponibles : ${error.message}`)
    }
  }

  show(preferences) {
    this.checkbox.checked = preferences.alertEmails
    this.checkbox.disabled = false
    this.dataset.state = 'ok'
  }

  fail(message) {
    this.dataset.state = 'error'
    this.status.dataset.state = 'error'
    this.status.textContent = message
  }

  async save(alertEmails) {
    this.checkbox.disabled = true
    this.status.textContent = ''
    delete this.status.dataset.state
    try {
      this.show(await request(this, PATH, { method: 'PUT', body: { alertEmails } }))
      this.status.textContent = alertEmails ? 'Alertes par e-mail activées.' : 'Alertes par e-mail désactivées.'
      this.dispatchEvent(new CustomEvent('credit-email-preferences:saved', { bubbles: true, detail: { alertEmails } }))
    } catch (error) {
      this.checkbox.checked = !alertEmails
      this.checkbox.disabled = false
      this.fail(`Préférence non enregistrée : ${error.message}`)
    }
  }
}

if (!customElements.get('credit-email-preferences')) customElements.define('credit-email-preferences', CreditEmailPreferencesElement)
