"""The ipvs-synproxy operations console (Flask); see issue 8."""
