// <admin-search for>: finds accounts by Clerk id, email or Stripe customer
// (GET /admin/accounts?query=). Choosing one (or the only one found) sets
// `user-id` on the element `for` names and dispatches
// `admin-search:selected` with `{userId}`.

import { adoptStyles, h, referenced, request, stylesheet } from '../credits/credits-api.js'

const STYLES = stylesheet(`
admin-search { display: block; border: 1px solid var(--border); border-radius: 0.6rem; padding: 1rem; background: #fff; min-width: 0; }
admin-search h2 { margin: 0 0 0.75rem; font-size: 1.1rem; }
.search__row { display: flex; gap: 0.5rem; }
.search__row input { flex: 1 1 0; width: 0; font: inherit; padding: 0.45rem 0.6rem; border: 1px solid var(--border); border-radius: 0.4rem; }
.search__results { list-style: none; margin: 0.75rem 0 0; padding: 0; display: grid; gap: 0.35rem; }
.search__result { text-align: left; width: 100%; }
.search__status { margin: 0.5rem 0 0; color: var(--muted); }
.search__status[data-state="error"] { color: var(--danger); }
`)

class AdminSearchElement extends HTMLElement {
  connectedCallback() {
    adoptStyles(this, STYLES)
    if (this.form) return
    this.input = h('input', { id: 'search-query', name: 'query', autocomplete: 'off', placeholder: 'user_…, adresse e-mail ou cus_…', required: true, maxlength: '320' })
    this.results = h('ul', { class: 'search__results' })
    this.status = h('p', { class: 'search__status', role: 'status' })
    this.form = h(
      'form',
      {},
      h('label', { for: 'search-query' }, 'Identifiant Clerk, e-mail ou client Stripe'),
      h('div', { class: 'search__row' }, this.input, h('button', { type: 'submit', class: 'search__submit' }, 'Chercher')),
    )
    this.form.addEventListener('submit', (event) => {
      event.preventDefault()
      this.search(this.input.value.trim())
    })
    this.replaceChildren(h('h2', {}, 'Trouver un compte'), this.form, this.status, this.results)
  }

  async search(query) {
    if (!query) return
    this.status.textContent = 'Recherche…'
    delete this.status.dataset.state
    try {
      const { users } = await request(this, `/admin/accounts?query=${encodeURIComponent(query)}`)
      this.show(users)
    } catch (error) {
      this.status.dataset.state = 'error'
      this.status.textContent = `Recherche impossible : ${error.message}`
    }
  }

  show(users) {
    this.status.textContent = users.length === 0 ? 'Aucun compte.' : `${users.length} compte${users.length > 1 ? 's' : ''}.`
    this.results.replaceChildren(
      ...users.map((user) => {
        const label = [user.userId, user.email ?? 'sans e-mail', user.stripeCustomerId, user.deleted ? 'supprimé' : null].filter(Boolean).join(' · ')
        const button = h('button', { type: 'button', class: 'search__result', 'data-user-id': user.userId }, label)
        button.addEventListener('click', () => this.select(user.userId))
        return h('li', {}, button)
      }),
    )
    if (users.length === 1) this.select(users[0].userId)
  }

  select(userId) {
    referenced(this)?.setAttribute('user-id', userId)
    this.dispatchEvent(new CustomEvent('admin-search:selected', { bubbles: true, detail: { userId } }))
  }
}

if (!customElements.get('admin-search')) customElements.define('admin-search', AdminSearchElement)
