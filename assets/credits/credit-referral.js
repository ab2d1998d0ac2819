// <credit-referral>: the person's referral code, how many friends used it
// and were rewarded, and, during the first 7 days after signing up, a form
// to enter a friend's code. Both get the bonus after the new user's first
// paid top-up.

import { adoptStyles, formatMicros, h, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
credit-referral { display: block; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
credit-referral h2 { margin: 0 0 0.75rem; font-size: 1.1rem; }
.referral__hint, .referral__message { margin: 0 0 0.75rem; color: var(--muted); }
.referral__label { font-weight: 600; font-size: 0.9rem; }
.referral__input { font: inherit; padding: 0.45rem 0.6rem; border: 1px solid var(--border); border-radius: 0.4rem; min-width: 0; }
.referral__status { margin: 0; grid-column: 1 / -1; }
.referral__status[data-state="error"] { color: var(--danger); }
.referral__code-row, .referral__counts, .referral__referred { margin: 0 0 0.5rem; }
.referral__code { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 1.2rem; letter-spacing: 0.1em; }
.referral__form { display: grid; gap: 0.35rem; margin-top: 0.5rem; }
.referral__row { display: flex; gap: 0.5rem; min-width: 0; }
.referral__row .referral__input { flex: 1 1 0; width: 0; text-transform: uppercase; }
`)

const REFUSALS = {
  REFERRAL_CODE_UNKNOWN: 'Ce code de parrainage est inconnu.',
  REFERRAL_WINDOW_CLOSED: "Un code de parrainage se saisit dans les 7 jours qui suivent l'inscription.",
  ALREADY_REFERRED: 'Vous avez déjà saisi un autre code de parrainage.',
  SELF_REFERRAL: 'Ce code est le vôtre ou celui d’un compte à la même adresse e-mail.',
}

class CreditReferralElement extends HTMLElement {
  connectedCallback() {
    adoptStyles(this, STYLES)
    if (!this.dataset.state) {
      this.dataset.state = 'loading'
      this.replaceChildren(h('p', { class: 'referral__message' }, 'Chargement…'))
    }
    this.load()
  }

  async load() {
    try {
      this.render(await request(this, '/api/credits/referral'))
    } catch (error) {
      this.dataset.state = error.status === 401 ? 'signed-out' : 'error'
      this.replaceChildren(
        h('h2', {}, 'Parrainage'),
        h('p', { class: 'referral__message', role: 'alert' }, error.status === 401 ? 'Connectez-vous pour voir votre code.' : `Parrainage indisponible : ${error.message}`),
      )
    }
  }

  render(data) {
    this.dataset.state = 'ok'
    const bonus = formatMicros(data.bonusMicros)
    const friends = data.referredCount === 1 ? '1 ami a utilisé votre code' : `${data.referredCount} amis ont utilisé votre code`
    const parts = [
      h('h2', {}, 'Parrainage'),
      h('p', { class: 'referral__hint' }, `Offrez votre code : après la première recharge de votre ami, vous recevez chacun ${bonus} de crédits.`),
      h('p', { class: 'referral__code-row' }, 'Votre code : ', h('strong', { class: 'referral__code' }, data.code)),
      h('p', { class: 'referral__counts' }, `${friends}, ${data.rewardedCount} récompensé${data.rewardedCount > 1 ? 's' : ''}.`),
    ]
    if (data.redeemUntil && !data.referred) parts.push(this.redeemForm())
    if (data.referred) parts.push(h('p', { class: 'referral__referred' }, 'Vous avez saisi le code d’un ami : votre bonus arrive avec votre première recharge.'))
    this.replaceChildren(...parts)
  }

  redeemForm() {
    const input = h('input', { id: 'referral-code', class: 'referral__input', name: 'code', autocomplete: 'off', maxlength: '8', spellcheck: 'false' })
    const form = h(
      'form',
      { class: 'referral__form' },
      h('label', { for: 'referral-code', class: 'referral__label' }, 'Un ami vous a donné un code ?'),
      h('div', { class: 'referral__row' }, input, h('button', { type: 'submit', class: 'referral__submit' }, 'Valider')),
      h('p', { class: 'referral__status', role: 'status' }),
    )
    form.addEventListener('submit', async (event) => {
      event.preventDefault()
      const status = form.querySelector('.referral__status')
      const button = form.querySelector('.referral__submit')
      button.disabled = true
      try {
        await request(this, '/api/credits/referral', { method: 'POST', body: { code: input.value } })
        await this.load()
      } catch (error) {
        button.disabled = false
        status.dataset.state = 'error'
        status.textContent = REFUSALS[error.code] ?? `Code non accepté : ${error.message}`
      }
    })
    return form
  }
}

if (!customElements.get('credit-referral')) customElements.define('credit-referral', CreditReferralElement)
