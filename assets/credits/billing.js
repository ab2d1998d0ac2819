// The /billing page: composes the credit elements and, back from Stripe
// Checkout, tells what happened. `?topup=success`: the payment is being
// confirmed (the webhook may lag): the page looks for the top-up's credit
// once, then again each time the balance changes (its stream, or its
// polling when the stream cannot open), for 90 s at most; then the history
// once more when its invoice link (read from Stripe after the credit, with
// no change of the balance) arrives. `?topup=canceled`: nothing was
// charged. Every change of the balance reloads the chart and the history.
// The page's elements are found by their ids in billing.html.

import './credit-balance.js'
import './credit-topup-dialog.js'
import './credit-history.js'
import './credit-usage-chart.js'
import './credit-auto-recharge.js'
import './credit-limits.js'
import './credit-referral.js'
import './credit-api-keys.js'
import './credit-email-preferences.js'
import { PENDING_TOPUP_KEY } from './credit-topup-dialog.js'
import { formatMicros, request } from './credits-api.js'

const POLL_INTERVAL_MS = 1000
const INVOICE_POLL_ATTEMPTS = 30

/** Reloads what a payment changes: the balance, the chart and the history. */
function refreshAccount() {
  for (const id of ['balance', 'usage', 'history']) document.getElementById(id)?.refresh?.()
}

function status(text, state) {
  const element = document.getElementById('topup-status')
  if (!element) return
  element.textContent = text
  element.dataset.state = state
  element.hidden = false
}

function pendingTopup() {
  try {
    return JSON.parse(sessionStorage.getItem(PENDING_TOPUP_KEY) ?? 'null')
  } catch {
    return null
  }
}

/** The top-up transaction that confirms the payment, if it landed. */
function landed(overview, pending, since) {
  return overview.transactions.find((t) =>
    t.type === 'TOP_UP' && (pending?.sessionId ? t.stripeSessionId === pending.sessionId : Date.parse(t.createdAt) >= since),
  )
}

const pause = () => new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS))

/** Reloads the history once the top-up's invoice link is there (bounded). */
async function awaitInvoiceLink(topup) {
  for (let attempt = 0; attempt < INVOICE_POLL_ATTEMPTS && !topup.invoiceUrl; attempt += 1) {
    await pause()
    try {
      const overview = await request(document.body, '/api/credits')
      const row = overview.transactions.find((t) => t.id === topup.id)
      if (row?.invoiceUrl) {
        // The same follow-up saves the payment's card: the auto-recharge
        // form can now offer it.
        refreshAccount()
        document.getElementById('auto-recharge')?.refresh?.()
        return
      }
    } catch {
      // Retried like the confirmation.
    }
  }
}

const CONFIRM_WITHIN_MS = 90000

/** The top-up's transaction once its credit is there, else null. */
async function lookForTopup(pending, since) {
  try {
    return landed(await request(document.body, '/api/credits'), pending, since) ?? null
  } catch {
    // Looked for again at the next change, like a late webhook.
    return null
  }
}

async function confirmTopup() {
  const pending = pendingTopup()
  const since = Date.now() - 15 * 60 * 1000
  status('Paiement reçu, confirmation en cours… Votre solde sera mis à jour automatiquement.', 'pending')
  const balance = document.getElementById('balance')
  const topup = await new Promise((resolve) => {
    let settled = false
    const finish = (found) => {
      if (settled) return
      settled = true
      clearTimeout(timeout)
      balance?.removeEventListener('credit-balance:changed', look)
      balance?.removeEventListener('credit-balance:loaded', look)
      resolve(found)
    }
    const look = async () => {
      const found = await lookForTopup(pending, since)
      if (found) finish(found)
    }
    const timeout = setTimeout(() => finish(null), CONFIRM_WITHIN_MS)
    balance?.addEventListener('credit-balance:changed', look)
    balance?.addEventListener('credit-balance:loaded', look)
    look()
  })
  if (!topup) {
    status("Le paiement n'est pas encore confirmé. Vos crédits apparaîtront dès sa réception, sans nouveau paiement.", 'late')
    return
  }
  sessionStorage.removeItem(PENDING_TOPUP_KEY)
  refreshAccount()
  status(`Paiement confirmé : ${formatMicros(topup.amountMicros, { signed: true })} ajoutés à vos crédits.`, 'confirmed')
  await awaitInvoiceLink(topup)
}

document.getElementById('balance')?.addEventListener('credit-balance:changed', () => {
  for (const id of ['usage', 'history']) document.getElementById(id)?.refresh?.()
})

const outcome = new URLSearchParams(window.location.search).get('topup')
if (outcome === 'success') {
  confirmTopup()
} else if (outcome === 'canceled') {
  sessionStorage.removeItem(PENDING_TOPUP_KEY)
  status("Paiement annulé : aucun montant n'a été débité.", 'canceled')
}
