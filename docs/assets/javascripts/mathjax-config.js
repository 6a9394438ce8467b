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
  // The combined config also defines the NativeMML output, whose styles declare @font-face rules for TeX
  // fonts this package does not ship (fonts/HTML-CSS/TeX/otf). The hidden assistive MathML matches them and
  // the browser requests the files: 404s. Locally installed fonts only, so nothing is requested.
  NativeMML: {
    styles: {
      "@font-face /*1*/": { src: "local('MathJax_Caligraphic')" },
      "@font-face /*2*/": { src: "local('MathJax_Caligraphic Bold')" },
      "@font-face /*3*/": { src: "local('MathJax_AMS')" },
      "@font-face /*4*/": { src: "local('MathJax_Script')" },
      "@font-face /*5*/": { src: "local('MathJax_Fraktur')" },
      "@font-face /*6*/": { src: "local('MathJax_Fraktur Bold')" }
    }
  },
  showMathMenu: false,
  messageStyle: "none"
};
