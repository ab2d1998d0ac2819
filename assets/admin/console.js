// The operator console (/admin): composes its elements. A search's choice
// opens the account in the element its `for` names.

import './admin-platform.js'
import './admin-search.js'
import './admin-account.js'
