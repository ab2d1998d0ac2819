// The /billing page: composes the credit elements and, back from Stripe
// Checkout, tells what happened. `?topup=success`: the payment is being
// confirmed (the webhook may lag) and the balance is reloaded until the
// top-up's credit is there, then the history once more when its invoice
// link (read from Stripe after the credit) arrives. `?topup=canceled`:
// nothing was charged. The page's elements are found by their ids in
// billing.html.

import './credit-balance.js'
import './credit-topup-dialog.js'
import './credit-history.js'
import './credit-usage-chart.js'
import './credit-auto-recharge.js'
import './credit-limits.js'
import './credit-referral.js'
import { PENDING_TOPUP_KEY } from './credit-topup-dialog.js'
import { formatMicros, request } from './credits-api.js'

const POLL_INTERVAL_MS = 1000
const POLL_ATTEMPTS = 90
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
        refreshAccount()
        return
      }
    } catch {
      // Retried like the confirmation.
    }
  }
}

async function confirmTopup() {
  const pending = pendingTopup()
  const since = Date.now() - 15 * 60 * 1000
  status('Paiement reçu, confirmation en cours… Votre solde sera mis à jour automatiquement.', 'pending')
  for (let attempt = 0; attempt < POLL_ATTEMPTS; attempt += 1) {
    try {
      const overview = await request(document.body, '/api/credits')
      const topup = landed(overview, pending, since)
      if (topup) {
        sessionStorage.removeItem(PENDING_TOPUP_KEY)
        refreshAccount()
        status(`Paiement confirmé : ${formatMicros(topup.amountMicros, { signed: true })} ajoutés à vos crédits.`, 'confirmed')
        await awaitInvoiceLink(topup)
        return
      }
    } catch {
      // A failed poll is retried like a late webhook.
    }
    await pause()
  }
  status("Le paiement n'est pas encore confirmé. Vos crédits apparaîtront dès sa réception, sans nouveau paiement.", 'late')
}

const outcome = new URLSearchParams(window.location.search).get('topup')
if (outcome === 'success') {
  confirmTopup()
} else if (outcome === 'canceled') {
  sessionStorage.removeItem(PENDING_TOPUP_KEY)
  status("Paiement annulé : aucun montant n'a été débité.", 'canceled')
}
