// Shared by the credit elements: authenticated requests to creditd, exact
// money formatting from integer micros (1 € = 1 000 000 micros), and the
// styles every element ships with (so one embedded on a page without
// creditd's stylesheet arrives styled).

/** An error answer of the API: `{error, message}` and the HTTP status. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message)
    this.status = status
    this.code = code
  }
}

/**
 * `fetch` against creditd. The base URL is the element's `api-base`
 * attribute (empty: same origin). A Clerk session on the page
 * (`window.Clerk.session`) gives a bearer token; otherwise the browser sends
 * the `__session` cookie of the same origin.
 */
export async function request(element, path, { method = 'GET', body } = {}) {
  const base = element.closest('[api-base]')?.getAttribute('api-base') ?? ''
  const headers = { Accept: 'application/json' }
  const token = await window.Clerk?.session?.getToken?.()
  if (token) headers.Authorization = `Bearer ${token}`
  if (body !== undefined) headers['Content-Type'] = 'application/json'
  const response = await fetch(base + path, {
    method,
    headers,
    credentials: base ? 'include' : 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  })
  let data = null
  try {
    data = await response.json()
  } catch {
    data = null
  }
  if (!response.ok) {
    throw new ApiError(response.status, data?.error ?? 'HTTP_ERROR', data?.message ?? `HTTP ${response.status}`)
  }
  return data
}

const MICROS_PER_EURO = 1000000n

/**
 * `12.34€` from integer micros, with BigInt arithmetic only (no float
 * rounding). `decimals` (0..6) digits are kept; the rest is cut toward
 * zero, or rounded away from zero with `roundUp` (a cost is never shown
 * smaller than it is). `signed` prefixes `+` to positive amounts.
 */
export function formatMicros(micros, { decimals = 2, roundUp = false, signed = false } = {}) {
  let value = BigInt(micros)
  const negative = value < 0n
  if (negative) value = -value
  const step = 10n ** BigInt(6 - decimals)
  let units = value / step
  if (roundUp && value % step !== 0n) units += 1n
  const scale = 10n ** BigInt(decimals)
  const whole = units / scale
  const fraction = (units % scale).toString().padStart(decimals, '0')
  const sign = negative && units !== 0n ? '-' : signed && units !== 0n ? '+' : ''
  return `${sign}${whole}${decimals > 0 ? `.${fraction}` : ''}€`
}

/** `5€` for 500 cents, `12.50€` for 1250: the dialog's amounts. */
export function formatCents(cents) {
  const value = BigInt(cents)
  return value % 100n === 0n ? `${value / 100n}€` : formatMicros(value * (MICROS_PER_EURO / 100n))
}

/**
 * Euros typed by a person (`12`, `12.5`, `12,50`) as integer cents, or
 * `null` when it is not an amount with at most two decimals.
 */
export function parseEuros(text) {
  const match = /^\s*(\d{1,9})(?:[.,](\d{1,2}))?\s*$/.exec(text)
  if (!match) return null
  const cents = (match[2] ?? '').padEnd(2, '0')
  return Number(BigInt(match[1]) * 100n + BigInt(cents))
}

const relative = new Intl.RelativeTimeFormat('fr', { numeric: 'auto' })
const STEPS = [
  ['second', 60],
  ['minute', 60],
  ['hour', 24],
  ['day', 30],
  ['month', 12],
  ['year', Infinity],
]

/** `il y a 5 minutes`, `hier`: a date relative to now, in French. */
export function relativeDate(iso, now = Date.now()) {
  let amount = Math.round((new Date(iso).getTime() - now) / 1000)
  for (const [unit, size] of STEPS) {
    if (Math.abs(amount) < size) return relative.format(amount, unit)
    amount = Math.round(amount / size)
  }
  return relative.format(amount, 'year')
}

/** Creates an element with attributes and children (text is set as text). */
export function h(name, attributes = {}, ...children) {
  const element = document.createElement(name)
  for (const [key, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue
    element.setAttribute(key, value === true ? '' : String(value))
  }
  element.append(...children.filter((child) => child !== null && child !== undefined))
  return element
}

/** The elements, for the rules of the base sheet they all share. */
const ELEMENTS = 'credit-balance, credit-topup-dialog, credit-history, credit-usage-chart, credit-auto-recharge, credit-limits, credit-referral, credit-api-keys, credit-email-preferences, demo-chat'

/**
 * A constructable stylesheet from `css`. Adopted by the element's root
 * rather than written inline: the pages' policy (`style-src 'self'`) has
 * no `'unsafe-inline'`, and constructed sheets are not inline styles.
 */
export function stylesheet(css) {
  const sheet = new CSSStyleSheet()
  sheet.replaceSync(css)
  return sheet
}

/**
 * What every element needs: the theme's defaults (`:where(:root)` weighs
 * nothing, so a page that sets its own theme wins), box sizing, buttons,
 * focus rings and `hidden` for the elements' own content only.
 */
const BASE = stylesheet(`
:where(:root) {
  --fg: #1b1f24; --muted: #59636e; --border: #d1d9e0; --accent: #2f5bea; --danger: #c4291d;
  --credit: #1a7f37; --debit: #bc4c00; --bg-soft: #f6f8fa;
}
:where(${ELEMENTS}), :where(${ELEMENTS}) * { box-sizing: border-box; }
:where(${ELEMENTS}) button {
  font: inherit; cursor: pointer; border-radius: 0.4rem; border: 1px solid var(--border);
  background: #fff; color: var(--fg); padding: 0.45rem 0.9rem; min-height: 2.5rem;
}
:where(${ELEMENTS}) :is(button, input, textarea):focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
:where(${ELEMENTS}) button:disabled { opacity: 0.6; cursor: progress; }
:where(${ELEMENTS})[hidden], :where(${ELEMENTS}) [hidden] { display: none !important; }
`)

/**
 * Adopts the base sheet and `sheet` into the root `element` is connected
 * to (the document, or the shadow root it lives in), each once.
 */
export function adoptStyles(element, sheet) {
  const root = element.getRootNode()
  if (!('adoptedStyleSheets' in root)) return
  const missing = [BASE, sheet].filter((s) => !root.adoptedStyleSheets.includes(s))
  if (missing.length > 0) root.adoptedStyleSheets = [...root.adoptedStyleSheets, ...missing]
}

/**
 * The element whose id `element`'s `for` attribute names, looked up in the
 * element's own root (document or shadow root); null when unset or absent.
 */
export function referenced(element) {
  const id = element.getAttribute('for')
  if (!id) return null
  const root = element.getRootNode()
  return root.getElementById?.(id) ?? null
}
