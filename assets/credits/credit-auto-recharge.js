// <credit-auto-recharge>: the auto-recharge form. When a spend takes the
// available balance under the threshold, the card saved by a top-up is
// charged the chosen amount, never more than the monthly maximum. Shows
// why creditd switched it off (a declined card, an authentication the bank
// asks for, a dispute, a refunded auto-recharge, a deleted account, an
// operator) and
// what was recharged this month.

import { ApiError, adoptStyles, formatCents, h, parseEuros, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
.auto-recharge { display: grid; gap: 0.5rem; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
.auto-recharge h2 { margin: 0; font-size: 1.1rem; }
.auto-recharge__description, .auto-recharge__month { margin: 0; color: var(--muted); }
.auto-recharge__row { display: flex; gap: 0.5rem; align-items: center; }
.auto-recharge__row input[type="text"] { width: 7rem; }
.auto-recharge__notice { margin: 0; color: #9a6700; }
.auto-recharge__error { margin: 0; color: #cf222e; }
.auto-recharge__save { justify-self: start; }
.auto-recharge__row input[type="text"] { font: inherit; padding: 0.45rem 0.6rem; border: 1px solid var(--border); border-radius: 0.4rem; min-width: 0; }
`)

const PATH = '/api/credits/auto-recharge'

const REASONS = {
  card_declined: 'votre carte a été refusée',
  authentication_required: 'votre banque demande une authentification : faites une recharge manuelle pour la confirmer',
  no_saved_card: "aucune carte n'est enregistrée",
  dispute: "un paiement de votre compte fait l'objet d'un litige, la carte enregistrée a été oubliée",
  refunded: 'une recharge automatique a été remboursée : réactivez-la si vous le souhaitez',
  account_deleted: 'votre compte a été supprimé, la carte enregistrée a été oubliée',
  operator: "notre équipe l'a désactivée : contactez le support pour en savoir plus",
}

function reasonText(reason) {
  return REASONS[reason] ?? `le paiement a échoué (${reason})`
}

class CreditAutoRechargeElement extends HTMLElement {
  connectedCallback() {
    adoptStyles(this, STYLES)
    if (this.form) return
    this.build()
    this.load()
  }

  build() {
    this.enabled = h('input', { type: 'checkbox', name: 'enabled', class: 'auto-recharge__enabled' })
    this.threshold = h('input', { type: 'text', inputmode: 'decimal', name: 'threshold', class: 'auto-recharge__threshold', autocomplete: 'off' })
    this.amount = h('input', { type: 'text', inputmode: 'decimal', name: 'amount', class: 'auto-recharge__amount', autocomplete: 'off' })
    this.notice = h('p', { class: 'auto-recharge__notice', role: 'status', hidden: true })
    this.month = h('p', { class: 'auto-recharge__month' })
    this.error = h('p', { class: 'auto-recharge__error', role: 'alert', hidden: true })
    this.save = h('button', { type: 'submit', class: 'auto-recharge__save' }, 'Enregistrer')
    this.form = h(
      'form',
      { class: 'auto-recharge', novalidate: true },
      h('h2', {}, 'Recharge automatique'),
      h('p', { class: 'auto-recharge__description' }, 'Quand votre solde passe sous le seuil, la carte de votre dernière recharge est débitée du montant choisi.'),
      h('label', { class: 'auto-recharge__row' }, this.enabled, ' Activer la recharge automatique'),
      h('label', { class: 'auto-recharge__row' }, 'Seuil (€) ', this.threshold),
      h('label', { class: 'auto-recharge__row' }, 'Montant rechargé (€) ', this.amount),
      this.notice,
      this.month,
      this.error,
      this.save,
    )
    this.form.addEventListener('submit', (event) => {
      event.preventDefault()
      this.submit()
    })
    this.append(this.form)
  }

  /** Reloads the settings (a top-up's follow-up may have saved its card). */
  refresh() {
    return this.load()
  }

  async load() {
    try {
      this.render(await request(this, PATH))
    } catch (error) {
      this.fail(error)
    }
  }

  render(settings) {
    this.settings = settings
    this.dataset.enabled = String(settings.enabled)
    this.dataset.monthTotalCents = String(settings.monthTotalCents)
    this.enabled.checked = settings.enabled
    this.threshold.value = settings.thresholdCents === null ? '5' : String(settings.thresholdCents / 100)
    this.amount.value = settings.amountCents === null ? '20' : String(settings.amountCents / 100)
    const notices = []
    if (settings.disabledReason) notices.push(`Recharge automatique désactivée : ${reasonText(settings.disabledReason)}.`)
    if (!settings.hasSavedCard) notices.push('Faites une recharge pour enregistrer une carte : elle servira aux recharges automatiques.')
    this.notice.textContent = notices.join(' ')
    this.notice.hidden = notices.length === 0
    this.month.textContent = `Ce mois-ci : ${formatCents(settings.monthTotalCents)} rechargés automatiquement, au plus ${formatCents(settings.monthlyMaxCents)}.`
    this.error.hidden = true
  }

  fail(error) {
    this.error.textContent = error instanceof ApiError ? error.message : 'Le service est injoignable ; réessayez.'
    this.error.hidden = false
  }

  async submit() {
    const thresholdCents = parseEuros(this.threshold.value)
    const amountCents = parseEuros(this.amount.value)
    if (thresholdCents === null || amountCents === null) {
      this.fail(new ApiError(400, 'INVALID_REQUEST', 'Indiquez le seuil et le montant en euros (ex. : 5 ou 12,50).'))
      return
    }
    this.save.disabled = true
    try {
      const saved = await request(this, PATH, {
        method: 'PUT',
        body: { enabled: this.enabled.checked, thresholdCents, amountCents },
      })
      this.render(saved)
      this.dispatchEvent(new CustomEvent('credit-auto-recharge:saved', { bubbles: true, detail: saved }))
    } catch (error) {
      this.fail(error)
    } finally {
      this.save.disabled = false
    }
  }
}

if (!customElements.get('credit-auto-recharge')) customElements.define('credit-auto-recharge', CreditAutoRechargeElement)
