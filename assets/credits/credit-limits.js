// <credit-limits>: the person's daily and monthly spending limits, what
// each UTC window has spent, when it starts again, and the ceilings an
// administrator set (a limit above one is refused by the API, naming it).
// An empty field means no limit. Amounts are typed in euros (`12,50`) and
// sent in micros; nothing is computed in floating point.

import { adoptStyles, formatMicros, h, parseEuros, request, stylesheet } from './credits-api.js'

const STYLES = stylesheet(`
credit-limits { display: block; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
credit-limits h2 { margin: 0 0 0.75rem; font-size: 1.1rem; }
.limits__hint, .limits__message { margin: 0 0 0.75rem; color: var(--muted); }
.limits__form { display: grid; grid-template-columns: repeat(auto-fit, minmax(14rem, 1fr)); gap: 0.75rem 1rem; align-items: start; }
.limits__window { display: grid; gap: 0.25rem; min-width: 0; }
.limits__label { font-weight: 600; font-size: 0.9rem; }
.limits__input { font: inherit; padding: 0.45rem 0.6rem; border: 1px solid var(--border); border-radius: 0.4rem; min-width: 0; }
.limits__spent, .limits__ceiling { margin: 0; font-size: 0.85rem; color: var(--muted); overflow-wrap: anywhere; }
.limits__save { justify-self: start; }
.limits__status { margin: 0; grid-column: 1 / -1; }
.limits__status[data-state="error"] { color: var(--danger); }
.limits__status[data-state="saved"] { color: var(--credit); }
`)

const MICROS_PER_CENT = 10000n

const dateTime = new Intl.DateTimeFormat('fr', { dateStyle: 'medium', timeStyle: 'short', timeZone: 'UTC' })

/** `12,50` for 12 500 000 micros: the field's text for a limit. */
function euros(micros) {
  return formatMicros(micros).replace('€', '').replace('.', ',')
}

class CreditLimitsElement extends HTMLElement {
  connectedCallback() {
    adoptStyles(this, STYLES)
    if (!this.dataset.state) {
      this.dataset.state = 'loading'
      this.replaceChildren(h('p', { class: 'limits__message' }, 'Chargement…'))
    }
    this.load()
  }

  async load() {
    try {
      this.render(await request(this, '/api/credits/limits'))
    } catch (error) {
      this.dataset.state = error.status === 401 ? 'signed-out' : 'error'
      this.replaceChildren(
        h('h2', {}, 'Limites de dépenses'),
        h('p', { class: 'limits__message', role: 'alert' }, error.status === 401 ? 'Connectez-vous pour voir vos limites.' : `Limites indisponibles : ${error.message}`),
      )
    }
  }

  /** One UTC window's field: the person's own limit, what `spending` shows spent, the ceiling. */
  windowField(label, own, ceiling, spending) {
    const id = `limits-${label}`
    const input = h('input', {
      id,
      class: 'limits__input',
      name: label,
      inputmode: 'decimal',
      autocomplete: 'off',
      placeholder: 'Aucune',
      value: own === null ? '' : euros(own),
    })
    const spent = formatMicros(spending.spentMicros, { roundUp: true })
    const limit = spending.limitMicros === null ? 'sans limite' : `sur ${formatMicros(spending.limitMicros)}`
    const reset = dateTime.format(new Date(spending.resetsAt))
    return h(
      'div',
      { class: 'limits__window' },
      h('label', { for: id, class: 'limits__label' }, label === 'daily' ? 'Par jour (€)' : 'Par mois (€)'),
      input,
      h('p', { class: 'limits__spent', 'data-window': label }, `${spent} dépensés ${limit} · remise à zéro le ${reset} UTC`),
      ceiling === null ? null : h('p', { class: 'limits__ceiling' }, `Plafond fixé par un administrateur : ${formatMicros(ceiling)}`),
    )
  }

  render(data) {
    this.dataset.state = 'ok'
    const form = h(
      'form',
      { class: 'limits__form', novalidate: true },
      this.windowField('daily', data.dailyMicros, data.dailyCeilingMicros, data.daily),
      this.windowField('monthly', data.monthlyMicros, data.monthlyCeilingMicros, data.monthly),
      h('button', { type: 'submit', class: 'limits__save' }, 'Enregistrer'),
      h('p', { class: 'limits__status', role: 'status' }),
    )
    form.addEventListener('submit', (event) => {
      event.preventDefault()
      this.save(form)
    })
    this.replaceChildren(
      h('h2', {}, 'Limites de dépenses'),
      h('p', { class: 'limits__hint' }, "Les discussions sur les clés de la plateforme s'arrêtent quand une limite est atteinte. Laissez vide pour aucune limite."),
      form,
    )
  }

  async save(form) {
    const status = form.querySelector('.limits__status')
    const body = {}
    for (const [name, field] of [['daily', 'dailyMicros'], ['monthly', 'monthlyMicros']]) {
      const text = form.elements[name].value.trim()
      if (text === '') {
        body[field] = null
        continue
      }
      const cents = parseEuros(text)
      if (cents === null) {
        status.dataset.state = 'error'
        status.textContent = `${name === 'daily' ? 'Limite par jour' : 'Limite par mois'} : saisissez un montant en euros, par exemple 12,50.`
        return
      }
      body[field] = Number(BigInt(cents) * MICROS_PER_CENT)
    }
    const button = form.querySelector('.limits__save')
    button.disabled = true
    try {
      const saved = await request(this, '/api/credits/limits', { method: 'PUT', body })
      this.render(saved)
      const done = this.querySelector('.limits__status')
      done.dataset.state = 'saved'
      done.textContent = 'Limites enregistrées.'
    } catch (error) {
      button.disabled = false
      status.dataset.state = 'error'
      status.textContent = error.message.includes('ceiling')
        ? 'Cette limite dépasse le plafond fixé par un administrateur.'
        : `Limites non enregistrées : ${error.message}`
    }
  }
}

if (!customElements.get('credit-limits')) customElements.define('credit-limits', CreditLimitsElement)
