// MathJax 2 served by this site (copied from the jupyter-server-mathjax package at build time).
// Arithmatex (generic mode) wraps math in \( \) and \[ \] inside elements of class "arithmatex".
// The package ships the HTML-CSS output with STIX-Web fonts (not the SVG output's files).
window.MathJax = {
  config: ["TeX-AMS-MML_HTMLorMML-full.js"],
  jax: ["input/TeX", "output/HTML-CSS"],
  "HTML-CSS": { availableFonts: ["STIX-Web"], preferredFont: "STIX-Web", webFont: "STIX-Web", imageFont: null },
  extensions: ["tex2jax.js"],
  TeX: { extensions: ["AMSmath.js", "AMSsymbols.js", "noErrors.js", "noUndefined.js"] },
  tex2jax: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    ignoreClass: ".*",
    processClass: "arithmatex"
  },
  showMathMenu: false,
  messageStyle: "none"
};
