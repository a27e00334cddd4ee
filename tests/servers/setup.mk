# Included by the root Makefile; `make setup` runs `servers-setup`.
# Installs the Azurite (Azure Blob emulator) npm package into the ignored folder .tools/azurite.
# Idempotent: does nothing if it is already installed. Without npm it only warns; the azure_server
# fixture then skips its tests. moto and fake-gcs-server come from pip (requirements-dev.txt).
AZURITE_VERSION ?= 3.37.0
AZURITE_DIR     := .tools/azurite
AZURITE_BIN     := $(AZURITE_DIR)/node_modules/.bin/azurite-blob

.PHONY: servers-setup servers-clean

servers-setup:
	@if [ -x "$(AZURITE_BIN)" ] && grep -q '"version": "$(AZURITE_VERSION)"' $(AZURITE_DIR)/node_modules/azurite/package.json 2>/dev/null; then \
		echo "servers-setup: azurite $(AZURITE_VERSION) already installed in $(AZURITE_DIR)"; \
	elif ! command -v npm >/dev/null 2>&1; then \
		echo "servers-setup: WARNING: npm not found; Azurite not installed, Azure emulator tests will be skipped" >&2; \
	else \
		echo "servers-setup: installing azurite $(AZURITE_VERSION) into $(AZURITE_DIR) (about a minute)"; \
		mkdir -p $(AZURITE_DIR) && \
		npm install --prefix $(AZURITE_DIR) azurite@$(AZURITE_VERSION) --no-audit --no-fund --loglevel=error \
		|| echo "servers-setup: WARNING: npm install of azurite failed; Azure emulator tests will be skipped" >&2; \
	fi

servers-clean:
	rm -rf $(AZURITE_DIR)
